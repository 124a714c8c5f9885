"""Shared pieces of experiment reports: machine records, JSON/markdown writing, loss plots."""

from __future__ import annotations

import functools
import json
import os
import platform
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch


def cpu_name() -> str:
    """The CPU model name (platform.processor() is empty on most Linux systems)."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown"


@functools.cache
def git_commit() -> str:
    """The repository's commit when this process first asked: the code a long study runs is the
    code it loaded at start, even if the checkout moves on while it runs."""
    try:
        out = subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5
        ).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        out = ""
    return out or "unknown"


@functools.cache
def worktree_dirty() -> bool | None:
    """Whether tracked files differed from the commit when this process first asked (None: no
    git): a result measured on uncommitted code says so. Recorded results (`bench/results/`,
    `results/`) are outputs, not code: a benchmark run after another's new record is clean."""
    try:
        out = subprocess.run(
            ["git", "status", "--porcelain", "-uno", "--", ".", ":!bench/results", ":!results"],
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return bool(out.stdout.strip()) if out.returncode == 0 else None


git_commit()  # at import, i.e. when a study process starts
worktree_dirty()


def cpu_seconds() -> tuple[float, float, float] | None:
    """(busy CPU seconds of the machine, all CPU seconds, this process's and its waited-for
    children's CPU seconds), for `other_cpu_share`; None where /proc/stat is missing."""
    try:
        fields = Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:9]
        user, nice, system, idle, iowait, irq, softirq, steal = map(int, fields)
        tick = os.sysconf("SC_CLK_TCK")
    except (OSError, ValueError, AttributeError):
        return None
    total = user + nice + system + idle + iowait + irq + softirq + steal
    t = os.times()
    return (total - idle - iowait) / tick, total / tick, t.user + t.system + t[2] + t[3]


def other_cpu_share(start: tuple | None, end: tuple | None = None) -> float | None:
    """Share of the machine's CPU time between two `cpu_seconds` (end: now) that other
    processes (or the hypervisor) took: a benchmark on a shared machine says how loaded it was."""
    end = cpu_seconds() if end is None else end
    if start is None or end is None or end[1] <= start[1]:
        return None
    busy, total, own = (e - s for s, e in zip(start, end, strict=True))
    return round(min(1.0, max(0.0, (busy - own) / total)), 3)


def machine_info() -> dict[str, Any]:
    """Where a result was measured: enough to tell two machines (and commits) apart."""
    commit = git_commit()
    return {
        "platform": platform.platform(),
        "processor": cpu_name(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "cuda": torch.cuda.get_device_name() if torch.cuda.is_available() else None,
        "python": platform.python_version(),
        "torch": torch.__version__,
        "commit": commit,
        "commit_dirty": worktree_dirty(),
    }


def parse_list(text: str, kind: type, name: str) -> tuple:
    """A comma-separated CLI list ("1.0,0.8") as a tuple, or a ValueError naming the option."""
    try:
        return tuple(kind(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise ValueError(f"--{name} {text!r}: expected comma-separated {kind.__name__}s") from None


def write_json(path: Path, data: Any) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(json.dumps(data, indent=2) + "\n")
    tmp.replace(path)


def pyplot():
    """matplotlib.pyplot on the headless Agg backend, or None (with a message) when missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print(
            "matplotlib is not installed: skipping the plot (pip install engram-lm[plot])",
            file=sys.stderr,
        )
        return None
    return plt


def plot_curves(
    curves: dict[str, list[list[float]]],
    path: Path,
    title: str,
    xlabel: str = "training tokens",
    ylabel: str = "validation loss (nats/token)",
    bands: dict[str, list[list[float]]] | None = None,
    log2_x: bool = False,
    zero_line: bool = False,
) -> Path | None:
    """One line per arm ([x, y] points), optional min/max band per arm; None without matplotlib.
    `log2_x`: doublings evenly spaced (token budgets); `zero_line`: y = 0 drawn (differences)."""
    plt = pyplot()
    if plt is None:
        return None
    fig, ax = plt.subplots(figsize=(7, 4.5), dpi=120)
    for name, points in curves.items():
        xs, ys = zip(*points, strict=True) if points else ((), ())
        (line,) = ax.plot(xs, ys, marker="o", markersize=3, label=name)
        if bands and name in bands and bands[name]:
            bx, lo, hi = zip(*bands[name], strict=True)
            ax.fill_between(bx, lo, hi, color=line.get_color(), alpha=0.2, linewidth=0)
    if log2_x:
        ax.set_xscale("log", base=2)
    if zero_line:
        ax.axhline(0.0, color="0.4", linewidth=0.8)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    ax.set_title(title)
    ax.grid(True, alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def save_report(
    out_dir: str | Path,
    report: dict[str, Any],
    png: str,
    plot: Callable[[dict, Path], Path | None],
    markdown: Callable[[dict, Path | None], str],
) -> str:
    """Write report.json, the plot `png` and report.md into out_dir; print and return the text."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "report.json", report)
    text = markdown(report, plot(report, out / png))
    (out / "report.md").write_text(text)
    print(text)
    return text


def markdown_table(headers: list[str], rows: list[list[Any]]) -> str:
    lines = ["| " + " | ".join(headers) + " |", "|" + "---|" * len(headers)]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in rows]
    return "\n".join(lines)
