"""``scratchcnn accuracy``: reproduce one accuracy target over several seeds, or tabulate."""

from __future__ import annotations

import argparse
import sys

from scratchcnn.cli import positive_int, seed_list, thread_count

DESCRIPTION = """\
Run an accuracy target, a fixed training recipe with a required accuracy: NumPy and its PyTorch
twin trained from the same weights on the same batches, once per seed; per-seed results, mean
and sample std go to JSON (rewritten after every seed), and the target is checked (exit status 1
if it is missed).

Targets (one command each, full datasets; --data-dir DIR where the IDX files live):
  scratchcnn accuracy mnist-simple-b64 --seeds 0,1,2 --out runs/accuracy/mnist-simple-b64.json
  scratchcnn accuracy mnist-simple-b10 --seeds 0,1,2 --out runs/accuracy/mnist-simple-b10.json
  scratchcnn accuracy mnist-strong     --seeds 0,1,2 --out runs/accuracy/mnist-strong.json
  scratchcnn accuracy fashion-simple   --seeds 0,1,2 --out runs/accuracy/fashion-simple.json
  scratchcnn accuracy fashion-strong   --seeds 0,1,2 --out runs/accuracy/fashion-strong.json
Then the README table:
  scratchcnn accuracy --table runs/accuracy/*.json

--limit-train/--limit-test/--epochs/--dataset shrink a run for a smoke test; such results are
marked as modified and never count as meeting (or missing) a target. Without --out they go to
runs/accuracy/modified/TARGET.json, so a smoke test never replaces a target's result (nor joins
the table of runs/accuracy/*.json); an explicit --out FILE is written (and replaced) as given."""


def register(subparsers: argparse._SubParsersAction) -> None:
    from scratchcnn.harness.accuracy import DEFAULT_SEEDS, TARGETS

    parser = subparsers.add_parser(
        "accuracy", help="reproduce an accuracy target over several seeds (JSON + table)",
        description=DESCRIPTION, formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("target", nargs="?", choices=tuple(TARGETS), metavar="TARGET",
                        help=f"one of {', '.join(TARGETS)}")
    parser.add_argument("--seeds", type=seed_list, default=list(DEFAULT_SEEDS),
                        help="comma-separated seeds, each 0 to 2**64 - 1 (default 0,1,2; at "
                        "least 3 to check a target)")
    parser.add_argument("--data-dir", help="directory holding the dataset's IDX files")
    parser.add_argument("--out", metavar="FILE",
                        help="results JSON (default runs/accuracy/TARGET.json; "
                        "TARGET-seeds-3-4-5.json for other seeds; under runs/accuracy/modified/ "
                        "when a smoke-test option changes the recipe)")
    parser.add_argument("--threads", type=thread_count,
                        help="PyTorch's threads and NumPy's MPI ranks, at most the available "
                        "cores (default: all of them; 1: one plain process each)")
    parser.add_argument("--epochs", type=positive_int, help="override (smoke tests only)")
    parser.add_argument("--limit-train", type=positive_int, metavar="N",
                        help="override (smoke tests only)")
    parser.add_argument("--limit-test", type=positive_int, metavar="N",
                        help="override (smoke tests only)")
    parser.add_argument("--dataset", choices=("mnist", "fashion-mnist", "mnist-sample"),
                        help="override (smoke tests only)")
    parser.add_argument("--table", nargs="+", metavar="JSON",
                        help="print the Markdown table of these results files and exit")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from scratchcnn.cli import CommandError, check_output_file, require, start_ranks
    from scratchcnn.harness import accuracy

    if args.table:
        if args.target:
            raise CommandError("give either TARGET or --table, not both")
        print(accuracy.markdown_table(accuracy.load_results(path) for path in args.table), end="")
        return 0
    if not args.target:
        raise CommandError(f"name a TARGET ({', '.join(accuracy.TARGETS)}) or use --table")
    overrides = {key: getattr(args, key) for key in ("epochs", "limit_train", "limit_test",
                                                     "dataset")
                 if getattr(args, key) is not None}
    require("torch", "an accuracy target (it trains the PyTorch twin too)")
    out = args.out or accuracy.default_results_path(args.target, args.seeds, bool(overrides))
    check_output_file(out)
    code = start_ranks(args, args.threads)
    if code is not None:
        return code  # the ranks ran the command
    from scratchcnn.harness import ranks

    main_rank = ranks.is_main()
    document = accuracy.run_target(
        args.target, args.seeds, out if main_rank else None, data_dir=args.data_dir,
        threads=args.threads, overrides=overrides,
        log=lambda line: print(line, file=sys.stderr, flush=True) if main_rank else None,
    )
    if not main_rank:  # rank 0 writes and prints the results
        return 0
    print(accuracy.markdown_table([document]), end="")
    for check in document["summary"]["checks"]:
        verdict = {True: "PASS", False: "FAIL", None: "----"}[check["passed"]]
        print(f"{verdict} {check['check']} (value {check['value']:.4g})"
              + (f" [{check['note']}]" if check.get("note") else ""))
    print(f"results: {out}")
    return 1 if document["summary"]["target_met"] is False else 0
