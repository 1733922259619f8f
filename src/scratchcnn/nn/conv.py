"""Placeholder: being written."""

from scratchcnn.nn.module import Module


class Conv2d(Module):
    pass
