from .condensenet import CondenseNet, LayerOptions, condensenet74, condensenet_cifar, densenet_lgc
from .densenet import BLOCK_TYPES, DenseNet, densenet121, densenet161, densenet169, densenet201, densenet_cifar
from .official import load_official_condensenet

__all__ = ["BLOCK_TYPES", "CondenseNet", "DenseNet", "LayerOptions", "condensenet74", "condensenet_cifar",
           "densenet121", "densenet161", "densenet169", "densenet201", "densenet_cifar", "densenet_lgc",
           "load_official_condensenet"]
