from .condensenet import CondenseNet, condensenet74, condensenet_cifar
from .densenet import BLOCK_TYPES, DenseNet, densenet121, densenet161, densenet169, densenet201, densenet_cifar

__all__ = ["BLOCK_TYPES", "CondenseNet", "DenseNet", "condensenet74", "condensenet_cifar", "densenet121",
           "densenet161", "densenet169", "densenet201", "densenet_cifar"]
