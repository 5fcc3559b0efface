"""How the studies' files reach the disk: each whole or not at all, through rmidl._files.atomic_write, so
a run killed while writing leaves the earlier file (or none), never half a results.json for `--from`."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from rmidl._files import atomic_write, shown

__all__ = ["save_figure", "write_json", "write_text"]


def write_text(path: Path, text: str) -> Path:
    """`text` as UTF-8 at `path`."""
    with atomic_write(path, shown(path)) as handle:
        handle.write(text.encode("utf-8"))
    return path


def write_json(path: Path, data: Any) -> Path:
    """`data` as indented JSON (no NaN or Infinity, which JSON has not; nothing but plain values)."""
    return write_text(path, json.dumps(data, indent=2, allow_nan=False, default=_refused) + "\n")


def save_figure(figure: Any, path: Path) -> Path:
    """A matplotlib figure as a PNG at `path`."""
    with atomic_write(path, shown(path)) as handle:
        figure.savefig(handle, format="png")
    return path


def _refused(value: object) -> object:
    raise TypeError(f"{type(value).__name__} is not JSON serialisable")
