"""NumPy vs PyTorch speed benchmark: the same code as ``scratchcnn bench``.

    python benchmarks/speed.py --model simple-cnn
    python benchmarks/speed.py --help

See benchmarks/README.md for how to read the output.
"""

import sys

from scratchcnn.cli import main

if __name__ == "__main__":
    sys.exit(main(["bench", *sys.argv[1:]]))
