"""Placeholder: being written."""

from scratchcnn.nn.module import Module


class BatchNorm2d(Module):
    pass
