"""What a benchmark measures of its own process and the machine: /proc counters, memory
sampled in the background, a timed phase's I/O and peak RSS, files' allocated bytes.

Linux only (/proc). Shared by the huge-table benchmarks (`huge_table.py`,
`sharded_huge_table.py`, `hf_huge_table.py`), which import it as a sibling module (a script's
folder is first on its import path).
"""

from __future__ import annotations

import gc
import os
import shutil
import threading
import time
from pathlib import Path
from typing import Any

GiB = 1 << 30


def gib(n: float | None) -> str:
    return "n/a" if n is None else f"{n / GiB:.2f} GiB"


# ---- the process and the machine ----------------------------------------------------------------
def read_kv(path: str) -> dict[str, int]:
    """`Key: value [kB]` lines of a /proc file (status, meminfo, io) in bytes; empty if the
    file is gone (a watched process that exited)."""
    out = {}
    try:
        with open(path) as f:
            for line in f:
                key, _, rest = line.partition(":")
                parts = rest.split()
                if parts and parts[0].isdigit():
                    out[key.strip()] = int(parts[0]) * (1024 if parts[1:2] == ["kB"] else 1)
    except OSError:
        pass
    return out


def device_sectors_written(path: Path) -> int | None:
    """Bytes written to the block device holding `path` since boot (all processes)."""
    dev = os.stat(path).st_dev
    major, minor = os.major(dev), os.minor(dev)
    try:
        with open("/proc/diskstats") as f:
            for line in f:
                p = line.split()
                if int(p[0]) == major and int(p[1]) == minor:
                    return int(p[9]) * 512
    except OSError:
        pass
    return None


def reset_peak_rss() -> bool:
    """Reset VmHWM to the current RSS (Linux >= 4.0), so each part reports its own peak."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
        return True
    except OSError:
        return False


class Sampler(threading.Thread):
    """Samples memory, page cache and free disk every `interval` s; maxima per phase."""

    STATUS = ("VmRSS", "RssAnon", "RssFile", "RssShmem")
    MEMINFO = ("Cached", "Dirty", "Writeback", "MemAvailable")

    def __init__(self, disk: Path, interval: float = 1.0, series_every: float = 5.0) -> None:
        super().__init__(daemon=True)
        self.disk, self.interval, self.series_every = disk, interval, series_every
        self.phase = "setup"
        self.peaks: dict[str, dict[str, int]] = {}
        self.series: list[dict[str, Any]] = []
        self.start_time = time.perf_counter()
        self._halt = threading.Event()
        self._lock = threading.Lock()

    def sample(self) -> dict[str, int]:
        status, mem = read_kv("/proc/self/status"), read_kv("/proc/meminfo")
        now = {k: status.get(k, 0) for k in self.STATUS}
        now.update({f"sys_{k}": mem.get(k, 0) for k in self.MEMINFO})
        now["disk_free"] = shutil.disk_usage(self.disk).free
        return now

    def record(self) -> dict[str, int]:
        now = self.sample()
        with self._lock:
            peak = self.peaks.setdefault(self.phase, {})
            for key, value in now.items():
                if key in ("sys_MemAvailable", "disk_free"):  # the low-water mark matters
                    peak[f"min_{key}"] = min(peak.get(f"min_{key}", value), value)
                else:
                    peak[f"max_{key}"] = max(peak.get(f"max_{key}", 0), value)
        return now

    def set_phase(self, phase: str) -> None:
        self.record()  # the end of the previous phase belongs to it
        with self._lock:
            self.phase = phase
        self.record()

    def run(self) -> None:
        last = -1e9
        while not self._halt.wait(self.interval):
            now = self.record()
            t = time.perf_counter() - self.start_time
            if t - last >= self.series_every:
                last = t
                keep = ("RssAnon", "RssFile", "sys_Cached", "sys_Dirty", "disk_free")
                self.series.append(
                    {"t": round(t, 1), "phase": self.phase, **{k: now[k] for k in keep}}
                )

    def stop(self) -> None:
        self._halt.set()
        self.join()


class Phase:
    """Wall time, process and device I/O, peak RSS of one part of the benchmark."""

    def __init__(self, name: str, sampler: Sampler, disk: Path) -> None:
        self.name, self.sampler, self.disk = name, sampler, disk

    def __enter__(self) -> Phase:
        # A finished run's model and stores form reference cycles (row sources point back at
        # their tables): collect them now, or the next part's memory includes the last one's.
        gc.collect()
        self.sampler.set_phase(self.name)
        self.hwm_reset = reset_peak_rss()
        self.io0 = read_kv("/proc/self/io")
        self.dev0 = device_sectors_written(self.disk)
        self.t0 = time.perf_counter()
        return self

    def __exit__(self, *exc: object) -> None:
        self.seconds = time.perf_counter() - self.t0
        io1, dev1 = read_kv("/proc/self/io"), device_sectors_written(self.disk)
        status = read_kv("/proc/self/status")
        self.sampler.set_phase(f"after-{self.name}")
        peaks = self.sampler.peaks.get(self.name, {})
        self.result = {
            "seconds": self.seconds,
            "peak_rss_bytes": status.get("VmHWM") if self.hwm_reset else None,
            "end_rss": {k: status.get(k) for k in ("VmRSS", "RssAnon", "RssFile")},
            "sampled": peaks,
            "io": {
                k: io1.get(k, 0) - self.io0.get(k, 0)
                for k in ("write_bytes", "read_bytes", "cancelled_write_bytes", "wchar", "rchar")
            },
            "device_bytes_written_all_processes": (
                dev1 - self.dev0 if dev1 is not None and self.dev0 is not None else None
            ),
        }


def allocated(path: Path) -> dict[str, int]:
    """Logical and allocated bytes of a file or of every file under a folder."""
    files = [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file()]
    stats = [p.stat() for p in files]
    return {
        "files": len(files),
        "logical_bytes": sum(s.st_size for s in stats),
        "allocated_bytes": sum(s.st_blocks * 512 for s in stats),
    }


def cleanup(folder: Path) -> dict[str, Any]:
    """Delete `folder`, timing each file: freeing a sparse file's extents is not free."""
    t0, slowest = time.perf_counter(), {"file": None, "seconds": 0.0, "allocated_bytes": 0}
    files = [p for p in folder.rglob("*") if p.is_file()] if folder.exists() else []
    total = 0
    for path in files:
        blocks = path.stat().st_blocks * 512
        total += blocks
        t = time.perf_counter()
        path.unlink()
        dt = time.perf_counter() - t
        if dt > slowest["seconds"]:
            slowest = {"file": str(path), "seconds": dt, "allocated_bytes": blocks}
    shutil.rmtree(folder, ignore_errors=True)
    seconds = time.perf_counter() - t0
    return {"files": len(files), "allocated_bytes": total, "seconds": seconds, "slowest": slowest}


def filesystem(path: Path) -> str | None:
    """The file-system type holding `path` (from /proc/mounts, longest matching mount point)."""
    target, best = str(path.resolve()), None
    try:
        with open("/proc/mounts") as f:
            for line in f:
                _, mount, kind, *_ = line.split()
                if (target == mount or target.startswith(mount.rstrip("/") + "/")) and (
                    best is None or len(mount) > len(best[0])
                ):
                    best = (mount, kind)
    except OSError:
        return None
    return best[1] if best else None
