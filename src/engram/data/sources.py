"""Text sources found on every machine: the Python standard library's own source files.

The split between train and validation is by a hash of the file's path relative to the stdlib
root, so it is the same on every machine and Python build that ships the same files.
"""

from __future__ import annotations

import hashlib
import sysconfig
from collections.abc import Iterator
from pathlib import Path


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def _split_of(relative: str, val_fraction: float) -> str:
    bucket = int(hashlib.sha256(relative.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF
    return "val" if bucket < val_fraction else "train"


def stdlib_files(
    split: str | None = None, val_fraction: float = 0.05, max_files: int | None = None
) -> list[Path]:
    """Sorted `.py` files of the running interpreter's stdlib (tests and site-packages excluded)."""
    if split not in (None, "train", "val"):
        raise ValueError(f"split={split!r} must be 'train', 'val' or None")
    root = stdlib_root()
    files = []
    for path in sorted(root.rglob("*.py")):
        rel = path.relative_to(root).as_posix()
        if rel.startswith(("site-packages/", "test/", "idlelib/idle_test/")) or "/tests/" in rel:
            continue
        if split is None or _split_of(rel, val_fraction) == split:
            files.append(path)
        if max_files is not None and len(files) >= max_files:
            break
    return files


def read_texts(paths: list[Path]) -> Iterator[str]:
    """File contents, skipping files that are not valid UTF-8."""
    for path in paths:
        try:
            yield path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue
