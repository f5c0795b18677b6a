"""gigatrain: train neural networks that are too big or too slow for one GPU.

``gigatrain.initialize(model, config)`` makes any ``nn.Module`` train under the layout the config
describes (see ``gigatrain.api``); ``gigatrain train`` is the command line.
"""
__version__ = "0.1.0"

__all__ = ["initialize", "parallelize"]


def __getattr__(name):
    # Imported on first use: ``import gigatrain`` stays cheap for the command line.
    if name in __all__:
        from . import api

        return getattr(api, name)
    raise AttributeError(f"module 'gigatrain' has no attribute {name!r}")
