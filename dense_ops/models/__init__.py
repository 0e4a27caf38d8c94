
from .condensenet import CondenseNet, condensenet74, condensenet_cifar  # noqa: F401
