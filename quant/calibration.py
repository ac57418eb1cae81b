"""Calibration text: the small corpus shipped in quant/data, or a user's UTF-8 file."""
from __future__ import annotations

from pathlib import Path

from edge_runtime.errors import InvalidArgumentError

SHIPPED = Path(__file__).parent / "data" / "calibration.txt"


def shipped_text() -> str:
    """The shipped corpus without its leading `#` comment lines (licence note)."""
    lines = SHIPPED.read_text(encoding="utf-8").splitlines(keepends=True)
    while lines and lines[0].startswith("#"):
        lines.pop(0)
    return "".join(lines)


def read_text(path: str | Path, what: str = "calibration") -> str:
    """A UTF-8 text file with some text in it; anything else is an error that says what to give instead."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as e:
        raise InvalidArgumentError(f"cannot read the {what} file {path}: {e.strerror}") from None
    try:
        text = data.decode("utf-8")
    except UnicodeDecodeError:
        raise InvalidArgumentError(f"the {what} file {path} is not UTF-8 text; give a plain text file") from None
    if "\x00" in text:
        raise InvalidArgumentError(f"the {what} file {path} is binary, not text; give a plain text file")
    if not text.strip():
        raise InvalidArgumentError(f"the {what} file {path} is empty; give a few KB of text like what the model "
                                   "will read")
    return text


def load_text(path: str | Path | None, what: str = "calibration") -> str:
    """The text of `path`, or the shipped corpus when no path is given."""
    return shipped_text() if path is None else read_text(path, what)
