"""Placeholder: being written."""

from scratchcnn.nn.module import Module


class Flatten(Module):
    pass
