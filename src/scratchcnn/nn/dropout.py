"""Placeholder: being written."""

from scratchcnn.nn.module import Module


class Dropout(Module):
    pass
