"""scratchcnn: a convolutional neural network written from scratch in NumPy, verified against
PyTorch and benchmarked side by side with it.

The engine (``scratchcnn.nn``, ``scratchcnn.optim``) imports NumPy only.
"""

from scratchcnn.random import default_rng, manual_seed

__version__ = "0.1.0"

__all__ = ["__version__", "default_rng", "manual_seed"]
