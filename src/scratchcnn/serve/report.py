"""A ``compare`` report, read once when the server starts.

The page shows ``report.md`` (written by ``harness/report.py``) as a list of blocks, which its
script turns into elements with text nodes only (nothing is parsed as HTML):

    {"type": "heading", "level": 2, "text": "Summary"}
    {"type": "paragraph", "text": "..."}     inline `code` and **bold** marks are kept
    {"type": "list", "items": ["...", ...]}
    {"type": "table", "header": [...], "rows": [[...], ...]}
    {"type": "image", "name": "curves.png", "alt": "curves"}

The plots are PNG files of the report directory named in ``report.json``'s ``plots`` or in an
image line of ``report.md``; each must be a plain file name (no directory part), a regular
file inside that directory and a PNG. They are read into memory here, and requests pick one by
name from that dictionary: no request reaches the filesystem.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
MAX_PLOT_BYTES = 20 * 1024 * 1024
MAX_REPORT_BYTES = 5 * 1024 * 1024
_PLOT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,99}\.png")
_IMAGE_LINE = re.compile(r"!\[(?P<alt>[^\]]*)\]\((?P<name>[^)\s]+)\)")
_LINK = re.compile(r"(?<!!)\[(?P<text>[^\]]+)\]\([^)]*\)")
_CELL_SEPARATOR = re.compile(r"(?<!\\)\|")
_RULE_ROW = re.compile(r"\|?\s*:?-{3,}:?\s*(\|\s*:?-{3,}:?\s*)*\|?")


class ReportError(ValueError):
    """A report directory that cannot be shown; the message names it and the problem."""


@dataclass
class Report:
    directory: Path
    blocks: list[dict[str, Any]]
    plots: dict[str, bytes] = field(default_factory=dict)

    def summary(self) -> dict[str, Any]:
        return {"available": True, "directory": str(self.directory), "blocks": self.blocks,
                "plots": sorted(self.plots)}


def load_report(directory: str | Path) -> Report:
    """The report in ``directory`` (which must hold ``report.json``); ReportError otherwise."""
    directory = Path(directory)
    if not directory.is_dir():
        raise ReportError(f"--report {directory}: no such directory")
    json_path = directory / "report.json"
    if not json_path.is_file():
        raise ReportError(f"--report {directory}: no report.json there; give the --out "
                          "directory of a scratchcnn compare run")
    try:
        data = json.loads(_read(json_path, MAX_REPORT_BYTES))
    except (ValueError, UnicodeDecodeError) as error:
        raise ReportError(f"{json_path}: not valid JSON ({error})") from None
    md_path = directory / "report.md"
    if md_path.is_file():
        try:
            blocks = parse_markdown(_read(md_path, MAX_REPORT_BYTES).decode("utf-8"))
        except UnicodeDecodeError as error:
            raise ReportError(f"{md_path}: not UTF-8 text ({error})") from None
    else:
        blocks = [{"type": "paragraph", "text": "(this report has no report.md)"}]
    names = []
    if isinstance(data, dict) and isinstance(data.get("plots"), dict):
        names += [name for name in data["plots"].values() if isinstance(name, str)]
    names += [block["name"] for block in blocks if block["type"] == "image"]
    plots = {}
    for name in dict.fromkeys(names):
        content = _plot(directory, name)
        if content is not None:
            plots[name] = content
    # An image line whose plot is missing or refused is shown as text saying so.
    for index, block in enumerate(blocks):
        if block["type"] == "image" and block["name"] not in plots:
            blocks[index] = {"type": "paragraph",
                             "text": f"(plot {block['name']} is not available)"}
    # Plots named only in report.json go at the end.
    shown = {block["name"] for block in blocks if block["type"] == "image"}
    blocks += [{"type": "image", "name": name, "alt": name} for name in plots if name not in shown]
    return Report(directory, blocks, plots)


def _read(path: Path, limit: int) -> bytes:
    with path.open("rb") as file:
        content = file.read(limit + 1)
    if len(content) > limit:
        raise ReportError(f"{path}: larger than {limit // 2**20} MiB; not a report file")
    return content


def _plot(directory: Path, name: str) -> bytes | None:
    """The bytes of the PNG ``name`` in ``directory``, or None if it is not an acceptable one."""
    if not _PLOT_NAME.fullmatch(name):
        return None
    path = directory / name
    try:
        if not path.is_file() or path.resolve().parent != directory.resolve():
            return None
        content = _read(path, MAX_PLOT_BYTES)
    except (OSError, ReportError):
        return None
    return content if content.startswith(PNG_SIGNATURE) else None


def parse_markdown(text: str) -> list[dict[str, Any]]:
    """The subset of Markdown that ``report.md`` uses, as blocks (see the module docstring)."""
    blocks: list[dict[str, Any]] = []
    paragraph: list[str] = []

    def flush() -> None:
        if paragraph:
            blocks.append({"type": "paragraph", "text": " ".join(paragraph)})
            paragraph.clear()

    lines = text.splitlines()
    i = 0
    while i < len(lines):
        line = lines[i].strip()
        heading = re.fullmatch(r"(#{1,6})\s+(.*)", line)
        image = _IMAGE_LINE.fullmatch(line)
        if not line:
            flush()
        elif heading:
            flush()
            blocks.append({"type": "heading", "level": len(heading.group(1)),
                           "text": _inline(heading.group(2))})
        elif image:
            flush()
            blocks.append({"type": "image", "name": image.group("name"),
                           "alt": image.group("alt")})
        elif line.startswith("|"):
            flush()
            rows = []
            while i < len(lines) and lines[i].strip().startswith("|"):
                rows.append(lines[i].strip())
                i += 1
            blocks.append(_table(rows))
            continue
        elif line.startswith(("- ", "* ")):
            flush()
            items: list[str] = []
            while i < len(lines) and lines[i].strip():
                item = lines[i].strip()
                if item.startswith(("- ", "* ")):
                    items.append(_inline(item[2:]))
                elif items:
                    items[-1] += " " + _inline(item)  # a wrapped list item
                i += 1
            blocks.append({"type": "list", "items": items})
            continue
        else:
            paragraph.append(_inline(line))
        i += 1
    flush()
    return blocks


def _inline(text: str) -> str:
    """Links become their text; code and bold marks stay for the page to render."""
    return _LINK.sub(lambda match: match.group("text"), text)


def _cells(row: str) -> list[str]:
    row = row.strip()
    row = row[1:] if row.startswith("|") else row
    row = row[:-1] if row.endswith("|") and not row.endswith("\\|") else row
    return [_inline(cell.strip().replace("\\|", "|")) for cell in _CELL_SEPARATOR.split(row)]


def _table(rows: list[str]) -> dict[str, Any]:
    header = _cells(rows[0])
    body = [_cells(row) for row in rows[1:] if not _RULE_ROW.fullmatch(row)]
    return {"type": "table", "header": header, "rows": body}
