"""sharpscope: sharpness-aware training and loss-geometry analysis for PyTorch."""

__version__ = "0.1.0"
