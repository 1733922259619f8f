"""The draw-a-digit page (``scratchcnn serve``): a small local web app around a checkpoint.

- ``locate.py``: which checkpoint and which ``compare`` report to show (the newest under
  ``runs/`` unless given);
- ``inference.py``: a drawn image made MNIST-like, the NumPy model run layer by layer (its
  prediction, every class's probability, the feature maps of each convolution) and, when
  PyTorch is installed, the PyTorch twin's answer, each with its time;
- ``report.py``: a compare report read once at start, its ``report.md`` as blocks (headings,
  tables, lists, plots) and its PNG plots held in memory under a whitelist of names;
- ``app.py``: the Starlette application (JSON API, size-limited bodies, JSON errors, static
  page from ``static/``, no asset from the internet).

Only ``app.py`` imports Starlette; nothing here is imported by the engine or the harness.
"""
