"""Placeholder: being written."""

from scratchcnn.nn.module import Module


class ReLU(Module):
    pass
