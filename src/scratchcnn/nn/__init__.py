"""Layers, losses and containers with the names and semantics of ``torch.nn``, written in NumPy.

Each layer's ``forward`` and ``backward`` sit together in one file, with the math in its docstring.
"""

from scratchcnn.nn import functional, init, parallel
from scratchcnn.nn.activation import ReLU
from scratchcnn.nn.batchnorm import BatchNorm2d
from scratchcnn.nn.conv import Conv2d
from scratchcnn.nn.dropout import Dropout
from scratchcnn.nn.flatten import Flatten
from scratchcnn.nn.linear import Linear
from scratchcnn.nn.loss import CrossEntropyLoss
from scratchcnn.nn.module import (
    Module,
    Parameter,
    Sequential,
    flatten_parameters,
    is_grad_enabled,
    no_grad,
    set_grad_enabled,
)
from scratchcnn.nn.pooling import AvgPool2d, MaxPool2d
from scratchcnn.nn.sync_batchnorm import SyncBatchNorm

__all__ = [
    "AvgPool2d",
    "BatchNorm2d",
    "Conv2d",
    "CrossEntropyLoss",
    "Dropout",
    "Flatten",
    "Linear",
    "MaxPool2d",
    "Module",
    "Parameter",
    "ReLU",
    "Sequential",
    "SyncBatchNorm",
    "flatten_parameters",
    "functional",
    "init",
    "is_grad_enabled",
    "no_grad",
    "parallel",
    "set_grad_enabled",
]
