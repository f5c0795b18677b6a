"""gigatrain: train neural networks that are too big or too slow for one GPU."""
__version__ = "0.1.0"
