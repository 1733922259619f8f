"""Placeholder: being written."""

from scratchcnn.nn.module import Module


class Linear(Module):
    pass
