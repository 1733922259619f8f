"""The PyTorch side of the comparison. Importing this package does not import torch; its
``torch_models`` module does, and is itself only imported by code that needs PyTorch."""
