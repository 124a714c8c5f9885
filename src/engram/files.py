"""Removing large files without waiting for the file system.

A disk table is a sparse file whose written rows are scattered 4 KiB extents: a 3 GiB table
after 200 steps holds about a million of them. Where the file system frees extents
synchronously (ext4 mounted with `discard` sends one discard per freed extent), unlinking such
a file took 590 s on this project's machine (`bench/results/huge_table.json`). Training must
not wait for that when it replaces a live table on resume or prunes an old checkpoint.

`remove_later(path)` renames the file or folder to a hidden `.trash-*` name beside it (instant
and atomic: the path is gone for every reader) and deletes it in a background thread. A
process that exits first leaves the `.trash-*` entry behind; `sweep_trash(folder)` removes such
leftovers the same way, and the places that write tables call it.
"""

from __future__ import annotations

import errno
import fcntl
import os
import shutil
import socket
import tempfile
import threading
import uuid
import weakref
from pathlib import Path

from safetensors import SafetensorError
from safetensors.torch import save_file

TRASH = ".trash-"
_in_flight: set[Path] = set()  # being deleted by this process's threads
_lock = threading.Lock()


def _delete(path: Path) -> None:
    try:
        if path.is_dir() and not path.is_symlink():
            shutil.rmtree(path, ignore_errors=True)
        else:
            path.unlink(missing_ok=True)
    finally:
        with _lock:
            _in_flight.discard(path)


def trash_name(path: Path) -> Path:
    """A fresh hidden name beside `path` for it to be deleted under."""
    return path.with_name(f"{TRASH}{uuid.uuid4().hex[:12]}-{path.name}")


def delete_in_background(path: Path) -> threading.Thread:
    """Delete `path` (already out of the way) in a daemon thread; returns the thread."""
    with _lock:
        _in_flight.add(path)
    worker = threading.Thread(target=_delete, args=(path,), name="engram-remove", daemon=True)
    worker.start()
    return worker


def remove_later(path: str | Path) -> threading.Thread | None:
    """Make `path` disappear now and free its blocks in the background (None: nothing there)."""
    path = Path(path)
    if not path.exists() and not path.is_symlink():
        return None
    hidden = trash_name(path)
    os.replace(path, hidden)
    return delete_in_background(hidden)


def writable_dir(path: str | Path) -> Path:
    """`path` as a folder that exists and takes new files, made if needed.

    Called before a command's work starts, so that an output folder the user cannot write is one
    clear error (ValueError naming the path) rather than a traceback minutes into a run.
    """
    path = check_writable(path)
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:  # e.g. a file of that name appeared since the check
        raise ValueError(f"cannot write to {path}: {e.strerror or e}") from None
    return path


def check_writable(path: str | Path) -> Path:
    """ValueError unless a folder could be made at `path` and take files; creates nothing.

    For commands that check their output folder before validating the rest of their input (a
    mistake must leave no folder behind): a temporary folder in the nearest existing ancestor
    proves the write, even for root, whom permission bits do not stop.
    """
    path = Path(path)
    ancestor = next((p for p in (path, *path.parents) if p.exists()), Path("."))
    try:
        if not ancestor.is_dir():
            raise NotADirectoryError(errno.ENOTDIR, "not a folder", str(ancestor))
        with tempfile.TemporaryDirectory(dir=ancestor):
            pass
    except OSError as e:
        raise ValueError(f"cannot write to {path}: {e.strerror or e}") from None
    return path


def sweep_trash(folder: str | Path) -> None:
    """Remove, in the background, what an earlier process left to delete in `folder`."""
    folder = Path(folder)
    if folder.is_dir():
        for leftover in folder.glob(f"{TRASH}*"):
            with _lock:
                busy = leftover in _in_flight
            if not busy:
                delete_in_background(leftover)


def fsync_file(path: Path) -> None:
    """Force a written file's data and size to stable storage."""
    _fsync(path, os.O_RDONLY)


def fsync_dir(path: Path) -> None:
    """Make the entries of a directory durable (a rename is only durable once its folder is)."""
    _fsync(path, os.O_RDONLY | getattr(os, "O_DIRECTORY", 0))


def _fsync(path: Path, flags: int) -> None:
    fd = os.open(path, flags)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


class FolderLock:
    """An exclusive claim on a folder for one process's lifetime (`flock` on `folder/.lock`).

    Two trainers writing one run folder would interleave their metrics and overwrite each other's
    checkpoints; the second is refused instead (ValueError naming the holder). The kernel drops
    the lock when its holder exits, however it exits, so a killed run never leaves a stale lock
    to clear by hand.
    """

    NAME = ".lock"

    def __init__(self, folder: str | Path) -> None:
        self.path = Path(folder) / self.NAME
        fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 200, 0).decode(errors="replace").strip() or "unknown"
            os.close(fd)
            raise ValueError(
                f"{folder} is in use by another run ({holder}): one run writes a folder at a time"
            ) from None
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"pid {os.getpid()} on {socket.gethostname()}\n".encode(), 0)
        # A holder dropped without `release` (a Run never closed) frees the folder when collected.
        self._closer = weakref.finalize(self, os.close, fd)

    def release(self) -> None:
        """Drop the claim (closing the descriptor drops the lock); calling it again does nothing."""
        self._closer()


FULL = (errno.ENOSPC, errno.EDQUOT)  # a full device, a full quota


def save_tensors(tensors: dict, path: str | Path, metadata: dict[str, str] | None = None) -> None:
    """`safetensors.torch.save_file`, with a full disk reported as the OSError(ENOSPC) any other
    write raises (safetensors words it as its own error), so callers handle one fault one way."""
    try:
        save_file(tensors, str(path), metadata=metadata)
    except SafetensorError as e:
        text = str(e)
        for code in FULL:
            if f"os error {code})" in text:
                raise OSError(code, os.strerror(code), str(path)) from e
        raise


def disk_full(e: BaseException) -> bool:
    """Whether `e` is a write refused because the device (or the quota) is full."""
    return isinstance(e, OSError) and e.errno in FULL
