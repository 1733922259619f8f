"""``scratchcnn bench``: time training steps and inference in NumPy and PyTorch, alternating."""

from __future__ import annotations

import argparse

from scratchcnn.cli import positive_int, start_ranks, thread_count
from scratchcnn.models import MODEL_NAMES

DESCRIPTION = """\
Time the NumPy engine against PyTorch on the same model, weights, batches and cores, in three
parts measured in one run: one process with one thread each (the plain loop against PyTorch on
one thread: training at batch 64 and inference); the NumPy side as N MPI ranks of one BLAS
thread (DistributedDataParallel) against PyTorch with N threads (N = --threads), for every
model: training steps (forward, loss, backward, Adam lr 1e-3) at each batch size, inference of
--inference-images images, peak memory (separate processes; NumPy's: the sum of its ranks'
peaks), GFLOP/s against this machine's measured float32 matmul peak, and the textbook loop
layers on a few images, extrapolated; and NumPy's step in one process against N ranks
(speed-up, efficiency). Rounds alternate NumPy, PyTorch, NumPy, PyTorch, ... after a warm-up;
the report gives median (min-max) per side and the ratio NumPy/PyTorch (below 1: NumPy is
faster). When ONNX Runtime is installed (pip install 'scratchcnn[onnx]'), inference has a third
side: the same weights exported with to_onnx, the same images, batches and thread count, with
the ratios NumPy/ONNX Runtime and PyTorch/ONNX Runtime; without it, one line says it was left
out.

Writes DIR/bench.json (every per-round number, environment) and DIR/bench.md, and prints the
Markdown. Threads: --threads, else $SCRATCHCNN_NUM_THREADS, else all available cores.
SCRATCHCNN_KEEP_FREED_MEMORY=1 runs both frameworks with glibc's malloc keeping the memory it
frees (fewer page faults; it speeds PyTorch's inference most); the default is the allocator as
shipped.

Expected run time with the defaults (simple-cnn at batches 10, 64, 256 and bn-cnn at 64) on a
2-core machine: a few minutes (bn-cnn does ~15x simple-cnn's work per image).
For a quicker look: --rounds 2 --steps 5 --batch-sizes 64 --inference-images 2000
--skip-memory."""


def _int_list(text: str) -> tuple[int, ...]:
    try:
        values = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError:
        values = ()
    if not values or min(values) < 1 or len(set(values)) != len(values):
        raise argparse.ArgumentTypeError(
            f"expected distinct positive integers separated by commas, got {text!r}")
    return values


def _models(text: str) -> tuple[str, ...]:
    if text.strip() == "all":
        return MODEL_NAMES
    names = tuple(name.strip() for name in text.split(",") if name.strip())
    unknown = [name for name in names if name not in MODEL_NAMES]
    if unknown or not names or len(set(names)) != len(names):
        raise argparse.ArgumentTypeError(
            f"expected 'all' or distinct names from {','.join(MODEL_NAMES)}, got {text!r}")
    return names


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "bench", help="NumPy vs PyTorch speed and memory (alternating rounds)",
        description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("--model", type=_models, default=("simple-cnn", "bn-cnn"),
                        metavar="NAMES", help="comma-separated model names or 'all' (default: "
                        "simple-cnn,bn-cnn); the first one also gets the one-process part")
    parser.add_argument("--batch-sizes", type=_int_list, default=(10, 64, 256), metavar="LIST",
                        help="the first model's training batch sizes (default: 10,64,256)")
    parser.add_argument("--other-batch-sizes", type=_int_list, default=(64,), metavar="LIST",
                        help="the other models' training batch sizes (default: 64)")
    parser.add_argument("--rounds", type=positive_int, default=5,
                        help="alternating timed rounds per side (default 5)")
    parser.add_argument("--steps", type=positive_int, default=30,
                        help="training steps per round (default 30, after 3 warm-up steps)")
    parser.add_argument("--inference-images", type=positive_int, default=10_000, metavar="N")
    parser.add_argument("--dtype", default="float32", choices=("float32", "float64"))
    parser.add_argument("--threads", type=thread_count,
                        help="PyTorch's threads and NumPy's MPI ranks, at most the available "
                             "cores (default: $SCRATCHCNN_NUM_THREADS, else all of them)")
    parser.add_argument("--dataset", choices=("mnist", "fashion-mnist", "mnist-sample", "random"),
                        help="images to time on (default: local MNIST if found, else random "
                             "images; naming a dataset may download it)")
    parser.add_argument("--data-dir", help="directory holding the dataset's IDX files")
    parser.add_argument("--reference-images", type=positive_int, default=2, metavar="N",
                        help="images for the textbook-loop timing (default 2)")
    parser.add_argument("--skip-memory", action="store_true", help="no peak-memory subprocesses")
    parser.add_argument("--skip-reference", action="store_true",
                        help="no textbook-loop timing")
    parser.add_argument("--out", default="runs/bench", metavar="DIR",
                        help="output directory (default: runs/bench)")
    parser.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    parser.set_defaults(func=run)


def resolve_threads(threads: int | None) -> int | None:
    """--threads (checked by its parser), else $SCRATCHCNN_NUM_THREADS (checked here, as
    --threads is), else None (all cores)."""
    from scratchcnn.cli import CommandError
    from scratchcnn.harness.threads import threads_from_environment

    if threads is not None:
        return threads
    try:
        return threads_from_environment("SCRATCHCNN_NUM_THREADS")
    except ValueError as error:
        raise CommandError(str(error)) from None


def run(args: argparse.Namespace) -> int:
    from scratchcnn.cli import check_output_dir, require
    from scratchcnn.data.sources import check_data_dir

    threads = resolve_threads(args.threads)
    if args.data_dir is not None:
        # Else a mistyped --data-dir would quietly time random images instead.
        check_data_dir(args.data_dir)
    require("torch", "bench")
    out = check_output_dir(args.out)
    code = start_ranks(args, threads)
    if code is not None:
        return code  # the ranks ran the command
    from scratchcnn.harness.bench import BenchConfig, run_bench
    from scratchcnn.harness.bench_report import check_targets, render_markdown, write_bench_report

    config = BenchConfig(
        models=args.model, batch_sizes=args.batch_sizes,
        other_batch_sizes=args.other_batch_sizes, rounds=args.rounds, steps=args.steps,
        inference_images=args.inference_images, dtype=args.dtype, threads=threads,
        dataset=args.dataset, data_dir=args.data_dir, memory=not args.skip_memory,
        reference=not args.skip_reference, reference_images=args.reference_images,
        quiet=args.quiet,
    )
    report = run_bench(config)
    if report is None:  # not rank 0: it writes the report
        return 0
    report["targets"] = check_targets(report)
    paths = write_bench_report(report, out)
    print(render_markdown(report))
    print(f"Report: {paths['json']}, {paths['markdown']}")
    return 0
