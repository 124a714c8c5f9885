"""Views of per-token gate activations: a self-contained HTML page and a matplotlib heat map.

Both colour a token by its gate on the same sequential scale (ColorBrewer YlOrRd: light yellow
for the least gated, dark red for the most; its lightness falls monotonically, so the order of
the colours is the order of the values, and it stays readable for most colour-blind readers).
The HTML page needs nothing outside itself: inline CSS, no script, no fonts or images to fetch.

Legend: T tokens, M hyper-connection branches.
"""

from __future__ import annotations

import html
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from engram.experiments.report import pyplot

# ColorBrewer YlOrRd, 9 classes, light to dark; interpolated linearly in between.
SCALE = (
    "#ffffcc",
    "#ffeda0",
    "#fed976",
    "#feb24c",
    "#fd8d3c",
    "#fc4e2a",
    "#e31a1c",
    "#bd0026",
    "#800026",
)
WRAP = 100  # columns per line in the PNG; longer lines wrap
MAX_LINES = 60  # lines per panel in the PNG; the HTML page always shows everything
FONT = 9.0  # points, in the PNG
CHAR_W = 0.602 * FONT / 72  # inches: the advance of DejaVu Sans Mono, matplotlib's own font
LINE_H = 1.55 * FONT / 72  # inches per line
MARGIN = 0.2  # inches
HEAD_ROWS = 5  # lines above the first panel: title, colour bar and its labels


@dataclass
class GateText:
    """One text: its token ids, the piece of text of each token, and gates {layer: [T, M]}."""

    text: str
    ids: list[int]
    pieces: list[str]
    gates: dict[int, np.ndarray]

    def mean(self, layer: int) -> np.ndarray:
        """The gate per token [T], averaged over the branches."""
        return self.gates[layer].mean(axis=1)

    def continuing(self) -> np.ndarray:
        """[T] bool: the token continues a word (alphanumeric on both sides of its start)."""
        flags = [False] * len(self.pieces)
        for i in range(1, len(self.pieces)):
            prev, cur = self.pieces[i - 1], self.pieces[i]
            flags[i] = bool(prev and cur and prev[-1].isalnum() and cur[0].isalnum())
        return np.array(flags, dtype=bool)

    def to_json(self) -> dict[str, Any]:
        return {
            "text": self.text,
            "ids": self.ids,
            "tokens": self.pieces,
            "gates": {str(k): [round(float(v), 6) for v in self.mean(k)] for k in self.gates},
            "branch_gates": {
                str(k): [[round(float(v), 6) for v in row] for row in g]
                for k, g in self.gates.items()
            },
        }


# ---- colours -------------------------------------------------------------------------------------
def _rgb(hex_colour: str) -> tuple[int, int, int]:
    return tuple(int(hex_colour[i : i + 2], 16) for i in (1, 3, 5))  # type: ignore[return-value]


def gate_colour(value: float, lo: float = 0.0, hi: float = 1.0) -> str:
    """The background colour (#rrggbb) of a gate `value` on the scale from `lo` to `hi`."""
    if not hi > lo:
        raise ValueError(f"colour range low={lo} must be below high={hi}")
    x = min(max((value - lo) / (hi - lo), 0.0), 1.0) * (len(SCALE) - 1)
    i = min(int(x), len(SCALE) - 2)
    a, b, f = _rgb(SCALE[i]), _rgb(SCALE[i + 1]), x - i
    return "#" + "".join(f"{round(p + (q - p) * f):02x}" for p, q in zip(a, b, strict=True))


def luminance(hex_colour: str) -> float:
    """Relative luminance (WCAG) of a #rrggbb colour, 0 black to 1 white."""
    lin = [c / 255 for c in _rgb(hex_colour)]
    lin = [c / 12.92 if c <= 0.04045 else ((c + 0.055) / 1.055) ** 2.4 for c in lin]
    return 0.2126 * lin[0] + 0.7152 * lin[1] + 0.0722 * lin[2]


def text_colour(background: str) -> str:
    """Black or white, whichever contrasts more with `background`."""
    return "#000000" if luminance(background) > 0.18 else "#ffffff"


# ---- HTML ----------------------------------------------------------------------------------------
CSS = """
body { font-family: system-ui, sans-serif; margin: 2em; color: #222; background: #fff; }
h1 { font-size: 1.3em; } h2 { font-size: 1.1em; margin-top: 1.6em; }
h3 { font-size: 0.95em; font-weight: normal; color: #555; margin: 0.8em 0 0.3em; }
.legend { display: flex; align-items: center; gap: 0.6em; margin: 1em 0; font-size: 0.9em; }
.legend .bar { display: inline-block; width: 18em; height: 1em; border: 1px solid #ccc; }
pre.tokens { font-family: ui-monospace, "DejaVu Sans Mono", monospace; font-size: 14px;
  line-height: 1.6; tab-size: 4; white-space: pre-wrap; overflow-wrap: anywhere; margin: 0;
  padding: 0.5em; border: 1px solid #eee; }
span.tok { box-shadow: inset -1px 0 rgba(255, 255, 255, 0.7); }
span.tok:hover { outline: 2px solid #000; }
"""


def _token_span(
    i: int, piece: str, token_id: int, branches: np.ndarray, lo: float, hi: float
) -> str:
    """One token: coloured by its mean gate, the branch values in the hover title."""
    value = float(branches.mean())
    bg = gate_colour(value, lo, hi)
    title = f"{piece!r}  id {token_id}  gate {value:.4f}"
    if branches.size > 1:
        title += "  (branches " + ", ".join(f"{b:.3f}" for b in branches) + ")"
    return (
        f'<span class="tok" data-i="{i}" data-gate="{value:.6f}" '
        f'title="{html.escape(title, quote=True)}" '
        f'style="background:{bg};color:{text_colour(bg)}">{html.escape(piece, quote=False)}</span>'
    )


def _legend(lo: float, hi: float) -> str:
    stops = ", ".join(SCALE)
    return (
        f'<div class="legend"><span>gate {lo:.3f}</span>'
        f'<span class="bar" style="background:linear-gradient(to right, {stops})"></span>'
        f"<span>{hi:.3f}</span><span>(least to most memory gated in; hover a token for its "
        f"value)</span></div>"
    )


def gates_html(texts: list[GateText], layers: list[int], lo: float, hi: float, title: str) -> str:
    """One self-contained page: a section per text, a row per Engram layer, a span per token."""
    parts = [
        '<!DOCTYPE html>\n<html lang="en">\n<head>\n<meta charset="utf-8">',
        f"<title>{html.escape(title)}</title>\n<style>{CSS}</style>\n</head>\n<body>",
        f"<h1>{html.escape(title)}</h1>",
        _legend(lo, hi),
    ]
    for n, t in enumerate(texts):
        parts.append(
            f'<section class="text" id="text-{n}"><h2>Text {n + 1} ({len(t.ids)} tokens)</h2>'
        )
        for layer in layers:
            spans = "".join(
                _token_span(i, piece, t.ids[i], t.gates[layer][i], lo, hi)
                for i, piece in enumerate(t.pieces)
            )
            parts.append(
                f'<div class="layer" data-layer="{layer}"><h3>Engram layer {layer}: mean gate '
                f"{float(t.mean(layer).mean()):.4f}</h3>"
                f'<pre class="tokens">{spans}</pre></div>'
            )
        parts.append("</section>")
    parts.append("</body>\n</html>\n")
    return "\n".join(parts)


# ---- PNG -----------------------------------------------------------------------------------------
def layout(pieces: list[str], wrap: int = WRAP) -> tuple[list[tuple[int, int, int, str]], int]:
    """Monospace runs (token, line, column, text) of the pieces, and the number of lines.

    Tabs expand to the next multiple of 4 columns, newlines start a line, long lines wrap.
    """
    runs: list[tuple[int, int, int, str]] = []
    line = col = 0
    for i, piece in enumerate(pieces):
        start, text = col, ""
        for ch in piece:
            if ch == "\n" or col >= wrap:
                if text:
                    runs.append((i, line, start, text))
                line, col, start, text = line + 1, 0, 0, ""
                if ch == "\n":
                    continue
            cells = 4 - col % 4 if ch == "\t" else 1
            text += " " * cells if ch == "\t" else ch
            col += cells
        if text:
            runs.append((i, line, start, text))
    return runs, line + 1


def plot_gates(
    texts: list[GateText], layers: list[int], lo: float, hi: float, path: Path, title: str
) -> Path | None:
    """The tokens laid out in lines, one panel per text and layer; None without matplotlib."""
    plt = pyplot()
    if plt is None:
        return None
    from matplotlib.colors import LinearSegmentedColormap

    panels = [(n, t, layer, *layout(t.pieces)) for n, t in enumerate(texts) for layer in layers]
    heights = [min(lines, MAX_LINES) + 2 for *_, lines in panels]  # + a heading and a gap
    cols = max((col + len(s) for p in panels for _, _, col, s in p[3]), default=1)
    width = max(6.0, min(WRAP, cols) * CHAR_W + 2 * MARGIN)
    rows = sum(heights) + HEAD_ROWS
    fig = plt.figure(figsize=(width, rows * LINE_H + MARGIN), dpi=150)
    fig_h = fig.get_figheight()
    ax = fig.add_axes((MARGIN / width, 0.0, 1 - 2 * MARGIN / width, 1 - MARGIN / 2 / fig_h))
    ax.set_xlim(0, (width - 2 * MARGIN) / CHAR_W)  # one data unit = one monospace column
    ax.set_ylim(rows, 0)  # one data unit = one line, top down
    ax.axis("off")
    ax.text(0, 0.5, title, fontsize=FONT + 1, va="center", weight="bold")
    # The colour bar on rows 1.5-2.5, under the title: same scale as every panel.
    bar_top = 1 - (MARGIN / 2 + 1.5 * LINE_H) / fig_h
    cax = fig.add_axes((MARGIN / width, bar_top - LINE_H / fig_h, 0.3, LINE_H / fig_h))
    cmap = LinearSegmentedColormap.from_list("gates", SCALE)
    cax.imshow(np.linspace(lo, hi, 256)[None], aspect="auto", cmap=cmap, extent=(lo, hi, 0, 1))
    cax.set_yticks([])
    cax.tick_params(labelsize=FONT - 2, pad=1, length=2)
    ax.text(
        0.33 * (width - 2 * MARGIN) / CHAR_W, 2.0, "gate (mean over branches)",
        fontsize=FONT - 1, va="center", color="#555",
    )  # fmt: skip
    y = float(HEAD_ROWS)
    for (n, t, layer, runs, lines), height in zip(panels, heights, strict=True):
        ax.text(0, y - 0.5, f"Text {n + 1}, Engram layer {layer}", fontsize=FONT, color="#555")
        _draw_runs(ax, runs, lines, t.mean(layer), y, lo, hi)
        y += height
    fig.savefig(path)
    plt.close(fig)
    return path


def _draw_runs(ax, runs, lines: int, values: np.ndarray, y: float, lo: float, hi: float) -> None:
    """Each run's background rectangle and text, lines from row `y` down."""
    from matplotlib.patches import Rectangle

    for i, line, col, text in runs:
        if line >= MAX_LINES:
            continue
        bg = gate_colour(float(values[i]), lo, hi)
        # Thin white edges mark where one token ends and the next begins, as in the HTML page.
        ax.add_patch(
            Rectangle((col, y + line), len(text), 1, facecolor=bg, edgecolor="#fff", linewidth=0.5)
        )
        ax.text(
            col, y + line + 0.5, text, fontsize=FONT, family="DejaVu Sans Mono",
            va="center", color=text_colour(bg),
        )  # fmt: skip
    if lines > MAX_LINES:
        ax.text(
            0, y + MAX_LINES + 0.5, f"... {lines - MAX_LINES} more lines in gates.html",
            fontsize=FONT - 1, color="#888", va="center",
        )  # fmt: skip


__all__ = [
    "SCALE",
    "GateText",
    "gate_colour",
    "gates_html",
    "layout",
    "luminance",
    "plot_gates",
    "text_colour",
]
