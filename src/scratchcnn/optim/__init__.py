"""Optimizers and learning-rate schedulers with ``torch.optim``'s names, arguments, defaults and
exact update rules. NumPy only; every update is in place on ``Parameter.data``."""

from scratchcnn.optim import lr_scheduler
from scratchcnn.optim.adam import Adam, AdamW
from scratchcnn.optim.optimizer import Optimizer
from scratchcnn.optim.sgd import SGD

__all__ = ["SGD", "Adam", "AdamW", "Optimizer", "lr_scheduler"]
