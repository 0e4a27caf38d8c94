from .densenet import BLOCK_TYPES, DenseNet, densenet121, densenet161, densenet169, densenet201, densenet_cifar

__all__ = ["BLOCK_TYPES", "DenseNet", "densenet121", "densenet161", "densenet169", "densenet201", "densenet_cifar"]
