"""Running experiments: the shared training loop, the NumPy-vs-PyTorch comparison, its report,
plots, environment description, timing/memory measurement and thread control.

Nothing here imports torch or matplotlib at module level; they load inside the functions that need
them, so ``import scratchcnn.harness`` stays cheap.
"""
