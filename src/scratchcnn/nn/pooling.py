"""Placeholder: being written."""

from scratchcnn.nn.module import Module


class AvgPool2d(Module):
    pass


class MaxPool2d(Module):
    pass
