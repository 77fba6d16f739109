"""kneeosteo: osteoporosis detection in knee radiographs (hybrid DenseNet169 + attention model)."""

__version__ = "0.2.0"
