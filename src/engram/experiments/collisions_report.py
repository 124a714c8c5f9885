"""The report of `engram study collisions`: markdown tables, the plot and the console summary."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from engram.experiments.report import markdown_table, pyplot, write_json


def _f(x: float | None, digits: int = 4) -> str:
    return "-" if x is None else f"{x:.{digits}f}"


def _order_table(report: dict) -> str:
    rows = [
        [
            o["order"],
            o["heads"],
            f"{o['prime_min']:,}-{o['prime_max']:,}",
            f"{o['distinct_ngrams']:,}",
            f"{o['distinct_rows']:,.0f}",
            f"{_f(o['utilisation'])} ({_f(o['uniform_utilisation'])})",
            f"{_f(o['collision_share'])} ({_f(o['uniform_collision_share'])})",
            f"{_f(o['collision_share_min'])}-{_f(o['collision_share_max'])}",
            _f(o["collided_lookups"]),
            f"{_f(o['all_heads_collide'])} ({_f(o['uniform_all_heads_collide'])})",
        ]
        for o in report["orders"]
    ]
    headers = ["order", "heads", "primes", "distinct N-grams", "rows used"]
    headers += ["utilisation (uniform)", "collision share (uniform)", "min-max over heads"]
    headers += ["lookups collided", "all heads of a layer collide (uniform)"]
    return markdown_table(headers, rows)


def _head_table(report: dict) -> str:
    rows = [
        [h["layer"], h["order"], h["head"]]
        + [f"{h[k]:,}" for k in ("prime", "distinct_ngrams", "distinct_rows")]
        + [_f(h[k]) for k in ("utilisation", "uniform_utilisation", "collision_share")]
        + [_f(h[k]) for k in ("uniform_collision_share", "collided_lookups")]
        for h in report["heads"]
    ]
    headers = ["layer", "order", "head", "prime", "distinct N-grams", "rows used"]
    headers += ["utilisation", "uniform", "collision share", "uniform", "lookups collided"]
    return markdown_table(headers, rows)


def _bucket_table(rows: list[dict]) -> str:
    with_loss = "loss_engram_on" in rows[0]
    headers = ["occurrences", "positions", "share", "distinct N-grams", "lookups collided"]
    if with_loss:
        headers += ["loss, Engram on", "loss, Engram off", "gain (off - on)"]
    table = []
    for r in rows:
        row = [
            r["bucket"],
            f"{r['positions']:,}",
            _f(r["position_share"]),
            f"{r['distinct_ngrams']:,}",
            _f(r["collided_lookups"]),
        ]
        if with_loss:
            row += [_f(r["loss_engram_on"]), _f(r["loss_engram_off"]), _f(r["engram_gain"])]
        table.append(row)
    return markdown_table(headers, table)


def _markdown(report: dict, plot: Path | None) -> str:
    c, m, spec = report["config"], report["machine"], report["config"]["spec"]
    ratios = ", ".join(
        f"order {o['order']} {o['collision_share'] / o['uniform_collision_share']:.3f}"
        for o in report["orders"]
        if o["uniform_collision_share"] > 0
    )
    loss = report["loss"]
    loss_text = (
        f"\nWith the checkpoint `{c['ckpt']}`, the mean next-token loss over "
        f"{loss['scored']:,} scored positions is {loss['engram_on']:.4f} nats with Engram on "
        f"and {loss['engram_off']:.4f} with it switched off (gain {loss['engram_gain']:+.4f}). "
        "The bucket tables split it by how often the position's N-gram (the one the memory "
        "looks up to predict the next token) occurs in the split.\n"
        if loss
        else ""
    )
    buckets = "\n\n".join(
        f"### Order {order}\n\n{_bucket_table(rows)}" for order, rows in report["buckets"].items()
    )
    return f"""# Engram hash collisions

Validation split of `{c["data"]}`: {c["tokens"]:,} tokens ({c["eos_tokens"]:,} documents ended),
tokenizer `{c["tokenizer"]}` ({spec["vocab_size"]:,} ids, {spec["compressed_vocab_size"]:,}
canonical), Engram layers {spec["layer_ids"]}, orders {spec["orders"]}, {spec["heads_per_order"]}
heads per order, document boundaries {"on" if spec["doc_boundaries"] else "off"}, spec digest
`{report["spec_digest"]}`. Machine: {m["processor"]}, {m["cpu_count"]} CPUs, torch {m["torch"]},
commit {m["commit"]}; {report["seconds"]:.1f} s.

A *collision* is a distinct N-gram whose row also holds another distinct N-gram of the split;
*lookups collided* weighs N-grams by how often they occur. In brackets: the expectation were the
hash a uniformly random function (collision 1-(1-1/p)^(n-1), utilisation 1-(1-1/p)^n for n
distinct N-grams and a table of p rows). Measured / uniform collision share: {ratios or "-"}
(1 means the hash behaves like a random function).
{loss_text}
{f"![collision share per head]({plot.name})" if plot else "(no plot: matplotlib is missing)"}

## Per order (mean over layers and heads)

{_order_table(report)}

## Per head

{_head_table(report)}

## By N-gram frequency in the split

{buckets}
"""


def _plot(report: dict, path: Path) -> Path | None:
    """Collision share per head vs the uniform expectation (and the gain per bucket)."""
    plt = pyplot()
    if plt is None:
        return None
    panels = 2 if report["loss"] else 1
    fig, axes = plt.subplots(1, panels, figsize=(7 * panels, 4.5), dpi=120, squeeze=False)
    ax, heads = axes[0][0], report["heads"]
    x = np.arange(len(heads))
    ax.bar(x, [h["collision_share"] for h in heads], label="measured")
    ax.scatter(
        x,
        [h["uniform_collision_share"] for h in heads],
        color="k",
        marker="_",
        s=200,
        zorder=3,
        label="uniform hash",
    )
    ax.set_xticks(
        x, [f"L{h['layer']} n{h['order']} h{h['head']}" for h in heads], rotation=90, fontsize=7
    )
    ax.set_ylabel("share of distinct N-grams sharing a row")
    ax.set_title("Collision share per head")
    ax.legend()
    if report["loss"]:
        ax = axes[0][1]
        width = 0.8 / len(report["buckets"])
        labels = [r["bucket"] for r in next(iter(report["buckets"].values()))]
        for i, (order, rows) in enumerate(report["buckets"].items()):
            gains = [np.nan if r["engram_gain"] is None else r["engram_gain"] for r in rows]
            ax.bar(np.arange(len(rows)) + i * width, gains, width, label=f"order {order}")
        ax.set_xticks(np.arange(len(labels)) + 0.4 - width / 2, labels)
        ax.set_xlabel("occurrences of the position's N-gram in the split")
        ax.set_ylabel("loss off - loss on (nats/token)")
        ax.set_title("What the memory gains, by N-gram frequency")
        ax.legend()
    for a in axes[0]:
        a.grid(True, axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)
    return path


def _print_table(report: dict) -> None:
    print(
        f"\n{'order':<6}{'N-grams':>10}{'rows used':>11}{'util':>8}{'collide':>9}"
        f"{'uniform':>9}{'all heads':>10}"
    )
    for o in report["orders"]:
        print(
            f"{o['order']:<6}{o['distinct_ngrams']:>10,}{o['distinct_rows']:>11,.0f}"
            f"{o['utilisation']:>8.4f}{o['collision_share']:>9.4f}"
            f"{o['uniform_collision_share']:>9.4f}{o['all_heads_collide']:>10.4f}"
        )
    order, rows = next(iter(report["buckets"].items()))
    print(f"\norder-{order} occurrences  positions  collided  loss on  loss off")
    for r in rows:
        print(
            f"{r['bucket']:<18}{r['positions']:>11,}{_f(r['collided_lookups']):>10}"
            f"{_f(r.get('loss_engram_on')):>9}{_f(r.get('loss_engram_off')):>10}"
        )


def write_report(report: dict, out: Path) -> None:
    """report.json, collisions.png and report.md in `out`, and a short table on stdout."""
    out.mkdir(parents=True, exist_ok=True)
    write_json(out / "report.json", report)
    plot = _plot(report, out / "collisions.png")
    (out / "report.md").write_text(_markdown(report, plot))
    _print_table(report)
    print(f"\nWrote {out / 'report.md'}, {out / 'report.json'}" + (f" and {plot}" if plot else ""))


__all__ = ["write_report"]
