"""The long-context study's report: accuracy heat maps by length and depth, tables, verdicts."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from engram.experiments.report import markdown_table, pyplot, save_report

# The paper's number (../shared/PAPER.md): RULER multi-query NIAH at 32k tokens, 27B models.
PAPER = {"benchmark": "multi-query NIAH (RULER)", "context": 32768, "moe": 84.2, "engram": 97.0}
LABELS = {"moe": "MoE", "engram": "Engram", "dense": "dense (attention-only control)"}


def write_report(out: Path, report: dict[str, Any]) -> str:
    """report.json, long_context.png and report.md in `out`; the markdown printed."""
    report["paper"] = PAPER
    return save_report(out, report, "long_context.png", _plot, _markdown)


def _plot(report: dict[str, Any], path: Path) -> Path | None:
    """One heat map per arm (mean exact accuracy over seeds) and Engram - MoE."""
    plt = pyplot()
    if plt is None:
        return None
    arms, probe = report["arms"], report["probe"]
    panels = [(LABELS[name], arm["exact"], "viridis", 0.0) for name, arm in arms.items()]
    diff = [
        [e - m for e, m in zip(er, mr, strict=True)]
        for er, mr in zip(arms["engram"]["exact"], arms["moe"]["exact"], strict=True)
    ]
    panels.append(("Engram - MoE", diff, "RdBu", -1.0))
    fig, axes = plt.subplots(1, len(panels), figsize=(4.2 * len(panels), 3.8), dpi=120)
    for ax, (title, table, cmap, low) in zip(axes, panels, strict=True):
        image = ax.imshow(table, cmap=cmap, vmin=low, vmax=1.0, aspect="auto", origin="lower")
        for i, row in enumerate(table):
            for j, value in enumerate(row):
                dark = cmap == "viridis" and value < 0.5  # white on viridis's dark half
                ax.text(
                    j,
                    i,
                    f"{value:.2f}",
                    ha="center",
                    va="center",
                    fontsize=8,
                    color="w" if dark else "k",
                )
        ax.set_xticks(range(len(probe["depths"])), [f"{d:g}" for d in probe["depths"]])
        ax.set_yticks(range(len(probe["lengths"])), [str(n) for n in probe["lengths"]])
        ax.set(xlabel="needle depth (share of the haystack before it)", title=title)
        fig.colorbar(image, ax=ax, fraction=0.046)
    axes[0].set_ylabel("context length (tokens)")
    fig.suptitle(f"Exact retrieval of {probe['needles']} needles per context, mean over seeds")
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def _per_seed(values: list[float], fmt: str = ".3f") -> str:
    return ", ".join(format(v, fmt) for v in values)


def _arms_table(report: dict[str, Any]) -> str:
    rows = [
        [
            LABELS[name],
            f"{a['p_tot']:,}",
            f"{a['p_act']:,}",
            f"{a['table_params']:,}",
            _per_seed(a["val_loss_per_seed"], ".4f"),
            _per_seed(a["accuracy_per_seed"]),
            f"{a['accuracy']:.3f}",
            f"{a['accuracy_spread']:.3f}",
            f"{a['token_accuracy']:.3f}",
        ]
        for name, a in report["arms"].items()
    ]
    headers = ["arm", "P_tot", "P_act", "table params", "val loss per seed"]
    headers += ["exact per seed", "mean", "spread", "value tokens right"]
    return markdown_table(headers, rows)


def _length_table(report: dict[str, Any]) -> str:
    lengths = report["probe"]["lengths"]
    rows = [
        [LABELS[name]]
        + [
            f"{a['by_length'][i]:.3f} ({_per_seed([s[i] for s in a['by_length_per_seed']])})"
            for i in range(len(lengths))
        ]
        for name, a in report["arms"].items()
    ]
    return markdown_table(["arm"] + [f"{n} tokens (per seed)" for n in lengths], rows)


def _comparison_table(report: dict[str, Any]) -> str:
    rows = [
        [
            c["pair"],
            c["length"],
            _per_seed(c["diff_per_seed"], "+.3f"),
            f"{c['diff_mean']:+.3f}",
            f"{c['threshold']:.3f}",
            c["verdict"],
        ]
        for c in report["comparisons"]
    ]
    headers = ["a - b", "length", "diff per seed", "mean", "threshold", "verdict"]
    return markdown_table(headers, rows)


def _cells(report: dict[str, Any]) -> list[str]:
    """Each arm's [length][depth] table of mean exact accuracy."""
    probe, parts = report["probe"], []
    for name, a in report["arms"].items():
        rows = [
            [n] + [f"{v:.2f}" for v in row]
            for n, row in zip(probe["lengths"], a["exact"], strict=True)
        ]
        parts += [
            f"**{LABELS[name]}**\n",
            markdown_table(["length \\ depth"] + [f"{d:g}" for d in probe["depths"]], rows),
            "",
        ]
    return parts


def _headline(report: dict[str, Any]) -> str:
    arms, probe, paper = report["arms"], report["probe"], report["paper"]
    longest = probe["lengths"].index(max(probe["lengths"]))
    rows = [
        [
            LABELS[name],
            f"{paper[name]:.1f}" if name in paper else "-",
            f"{100 * arms[name]['by_length'][longest]:.1f}",
            f"{100 * arms[name]['accuracy']:.1f}",
        ]
        for name in arms
    ]
    headers = [
        "arm",
        f"paper: {paper['benchmark']}, {paper['context']:,} tokens, 27B",
        f"ours: {max(probe['lengths'])} tokens",
        "ours: all lengths",
    ]
    return markdown_table(headers, rows)


def _markdown(report: dict[str, Any], png: Path | None) -> str:
    c, m, probe, corpus = report["config"], report["machine"], report["probe"], report["corpus"]
    seeds = len(c["seeds"])
    cells = len(probe["lengths"]) * len(probe["depths"])
    baseline = f" with the MoE of `{c['baseline']}`" if c["baseline"] else ""
    parts = [
        "# Long context: multi-query needle retrieval (issue 17)\n",
        f"Preset `{c['preset']}`{baseline}, Engram arm at rho {report['plan']['rho']:.3f}; "
        f"seeds {c['seeds']}; "
        f"{report['tokens_per_arm']:,} training tokens per arm ({c['steps']} steps of "
        f"{c['batch_size']} x {c['seq_len']}). Training corpus: `{c['data']}` (training split) "
        f"cut into pieces, {corpus['needle_documents']:,} of {corpus['documents']:,} documents "
        f"with {probe['needles']} needles and their queries (about {corpus['needle_tokens']:,} of "
        f"{corpus['tokens']:,} tokens). Probe: {probe['samples']} contexts per cell, {cells} cells "
        f"(lengths {probe['lengths']} x depths {probe['depths']}), from the validation split. "
        f"Machine {m['processor']}, {m['cpu_count']} CPUs, torch {m['torch']}, commit "
        f"{m['commit']}{' (dirty)' if m['commit_dirty'] else ''}; {report['seconds']:.0f} s.\n",
        "## Paper and ours (exact retrieval, %)\n",
        _headline(report),
        "\nThe paper's models are 27B parameters at 32k tokens after long-context extension; "
        "ours are CPU-sized and read at most the context they trained on. Only the direction "
        "of the Engram - MoE difference is comparable, not the level.\n",
        "## Arms\n",
        _arms_table(report),
        f"\nexact: share of queries whose every value token is the top-1 (teacher-forced, "
        f"which is greedy decoding); {report['arms']['moe']['queries_per_seed']} queries per "
        f"arm and seed. value tokens right: the share of value tokens that are the top-1 "
        "(partial credit; frequency alone gets a digit token right about 1 time in 10). "
        f"Copying a random needle's value would score 1/{probe['needles']}. spread: max - min over "
        "seeds. The validation loss is on the needle corpus's validation split.\n",
        "## By context length\n",
        _length_table(report),
        "\n## Differences\n",
        _comparison_table(report),
        "\nA difference is resolved when |mean| exceeds twice the larger seed spread of the "
        "two arms (the threshold)"
        + ("; one seed measures no spread, so nothing is resolved.\n" if seeds < 2 else ".\n"),
        "## By length and depth\n",
        f"![exact retrieval by length and depth]({png.name})\n" if png else "(no plot)\n",
        *_cells(report),
    ]
    return "\n".join(parts)
