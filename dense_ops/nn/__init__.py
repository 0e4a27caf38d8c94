from .dense import DenseBlock, DenseLayer, Transition

__all__ = ["DenseBlock", "DenseLayer", "Transition"]
