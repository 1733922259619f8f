"""Placeholder: being written."""

from scratchcnn.nn.module import Module


class CrossEntropyLoss(Module):
    pass
