"""`engram study gates`: token pieces, the HTML builder, the study end to end, and the page as a
real browser renders it (headless Chromium; skipped only when no Chromium binary is installed)."""

from __future__ import annotations

import html
import itertools
import json
import re
import shutil
import subprocess
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
import pytest
import torch

from engram.cli import main
from engram.experiments.gates import capture_gates, read_texts, token_pieces
from engram.experiments.gates_view import (
    SCALE,
    GateText,
    gate_colour,
    gates_html,
    layout,
    luminance,
)
from engram.inference.load import load_trained
from engram.tokenizer import train_bpe

# Markup characters that must show as text: a page that parsed them would gain a <b> element.
SPECIAL = "if a < b && c > \"d\": s = '<b>bold</b>'  # café\n\tnext & last"
ENTITY = "Only Alexander the Great could tame the horse Bucephalus."
CHROMIUM = next(
    (
        path
        for name in ("chromium", "chromium-browser", "google-chrome", "google-chrome-stable")
        if (path := shutil.which(name))
    ),
    None,
)


class TokenPage(HTMLParser):
    """Every `span.tok` of every `pre.tokens`: attributes and text; and every other tag seen."""

    def __init__(self) -> None:
        super().__init__()
        self.rows: list[list[tuple[dict, str]]] = []  # one list per pre.tokens, in page order
        self.tags: list[str] = []
        self.in_pre = False
        self.span: dict | None = None

    def handle_starttag(self, tag, attrs):
        attrs = dict(attrs)
        self.tags.append(tag)
        if tag == "pre" and attrs.get("class") == "tokens":
            self.in_pre = True
            self.rows.append([])
        elif tag == "span" and self.in_pre:
            self.span = attrs
            self.rows[-1].append((attrs, ""))

    def handle_endtag(self, tag):
        if tag == "pre":
            self.in_pre = False
        elif tag == "span":
            self.span = None

    def handle_data(self, data):
        if self.span is not None:
            attrs, text = self.rows[-1][-1]
            self.rows[-1][-1] = (attrs, text + data)


def _parse(page: str) -> TokenPage:
    parser = TokenPage()
    parser.feed(page)
    return parser


# ---- without a model ----------------------------------------------------------------------------
def test_colours_are_monotone_in_the_gate():
    values = np.linspace(0.0, 1.0, 101)
    lum = [luminance(gate_colour(v)) for v in values]
    assert all(a > b for a, b in itertools.pairwise(lum)), "lightness must fall with the gate"
    assert gate_colour(0.0) == SCALE[0] and gate_colour(1.0) == SCALE[-1]
    assert gate_colour(0.2, lo=0.3, hi=0.9) == SCALE[0]  # clamped below the range
    assert gate_colour(0.6, lo=0.2, hi=0.6) == SCALE[-1]
    with pytest.raises(ValueError, match="below high"):
        gate_colour(0.5, lo=0.5, hi=0.5)


def test_html_escapes_and_has_one_span_per_token():
    pieces = ["if", " a", " <", " b", " &&", ' "', "d", '"', ":", " '<b>", "x", "</b>'"]
    pieces += ["\n\t", "ok"]
    T = len(pieces)
    rng = np.random.default_rng(0)
    gates = {1: rng.uniform(0.1, 0.9, (T, 2)), 3: rng.uniform(0.1, 0.9, (T, 2))}
    text = GateText("".join(pieces), list(range(T)), pieces, gates)
    page = gates_html([text, text], [1, 3], 0.1, 0.9, "gates of <run> & co")
    parsed = _parse(page)
    assert "b" not in parsed.tags and "script" not in parsed.tags  # token text stayed text
    assert "http" not in page and "<link" not in page  # self-contained
    assert len(parsed.rows) == 4  # 2 texts x 2 layers
    for row, layer in zip(parsed.rows, [1, 3, 1, 3], strict=True):
        assert len(row) == T
        assert "".join(t for _, t in row) == text.text  # whitespace and newlines kept as is
        for i, (attrs, _) in enumerate(row):
            mean = gates[layer][i].mean()
            assert int(attrs["data-i"]) == i
            assert float(attrs["data-gate"]) == pytest.approx(mean, abs=1e-6)
            assert f"gate {mean:.4f}" in attrs["title"] and "branches" in attrs["title"]
            assert gate_colour(mean, 0.1, 0.9) in attrs["style"]
    assert "&lt;run&gt; &amp; co" in page


def test_token_pieces_cover_the_text_exactly():
    tok = train_bpe([SPECIAL * 3, ENTITY * 3, "naïve café 日本語 😀"], vocab_size=300)
    for text in (SPECIAL, ENTITY, "naïve café 日本語 😀\n\n  x", ""):
        ids, pieces = token_pieces(tok, text)
        assert ids == tok.encode(text) and len(pieces) == len(ids)
        assert "".join(pieces) == text


def test_layout_and_read_texts(tmp_path: Path):
    runs, lines = layout(["a\tb", "\n", "  c", "x" * 7], wrap=5)
    assert runs == [(0, 0, 0, "a   b"), (2, 1, 0, "  c"), (3, 1, 3, "xx"), (3, 2, 0, "xxxxx")]
    assert lines == 3
    f = tmp_path / "t.txt"
    f.write_text("one\ntwo\n\n\nthree\n  \nfour")
    assert read_texts([str(f)], whole=False) == ["one\ntwo\n", "three\n", "four"]
    assert read_texts([str(f)], whole=True) == [f.read_text()]
    with pytest.raises(ValueError, match="--file"):
        read_texts([str(tmp_path / "missing.txt")], whole=False)


# ---- the study -----------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def study(tmp_path_factory, stdlib_corpus) -> Path:
    """`engram study gates --quick` on two texts: a tiny model trained for 30 steps."""
    tmp = tmp_path_factory.mktemp("gates")
    corpus = stdlib_corpus(60)
    out = tmp / "out"
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("ENGRAM_CACHE_DIR", str(tmp / "cache"))
        argv = ["study", "gates", "--quick", "--data", str(corpus), "--out", str(out)]
        assert main([*argv, "--text", SPECIAL, "--text", ENTITY]) == 0
    return out


def test_study_report(study: Path):
    report = json.loads((study / "report.json").read_text())
    assert report["layers"] == [1] and report["config"]["branches"] == 2
    assert [t["text"] for t in report["texts"]] == [SPECIAL, ENTITY]
    for t in report["texts"]:
        assert "".join(t["tokens"]) == t["text"] and len(t["ids"]) == len(t["tokens"])
        gates, branches = np.array(t["gates"]["1"]), np.array(t["branch_gates"]["1"])
        assert branches.shape == (len(t["ids"]), 2)
        assert ((branches > 0) & (branches < 1)).all()
        np.testing.assert_allclose(gates, branches.mean(axis=1), atol=2e-6)
    assert report["machine"]["python"]
    # In the file itself, between the token tags, markup characters only appear as entities.
    page = (study / "gates.html").read_text()
    for pre in re.findall(r'<pre class="tokens">(.*?)</pre>', page, flags=re.S):
        inner = re.sub(r"<span [^>]*>|</span>", "", pre)
        assert "<" not in inner and ">" not in inner and not re.search(r"&(?!lt;|gt;|amp;)", inner)
        assert html.unescape(inner) in (SPECIAL, ENTITY)
    md = (study / "report.md").read_text()
    assert "Most gated in" in md and "Least gated in" in md
    assert (study / "gates.png").stat().st_size > 5000
    assert main(["study", "gates", "--text", "x"]) == 2  # neither --ckpt nor --quick


@torch.no_grad()
def test_hooked_gates_equal_a_hand_run_forward(study: Path):
    """The pre-hook sees exactly the Engram layer's input: redo the forward up to it by hand."""
    trained = load_trained(study / "model", device="cpu")
    model = trained.model
    report = json.loads((study / "report.json").read_text())
    ids = report["texts"][1]["ids"]
    x = torch.tensor([ids])
    h = model.embed(x).unsqueeze(2).expand(1, len(ids), 2, model.config.d_model)  # [1, T, M, d]
    h = model.blocks[0](h, None)  # block 0 has no Engram; block 1's Engram reads its output
    expected = model.blocks[1].engram.gates(h, model.hash(x)[1])[0]  # [T, M]
    got = torch.tensor(report["texts"][1]["branch_gates"]["1"])
    # 1e-5: the report rounds to 6 decimals; the forward itself is the same fp32 arithmetic.
    diff = (got - expected).abs()
    assert diff.max() < 1e-5, f"max diff {diff.max():.2e}, mean {diff.mean():.2e}"
    # Longer than max_seq_len: windows of fresh context, so the first window is unchanged.
    long_ids = (ids * 40)[: model.config.max_seq_len + 30]
    full = capture_gates(model, long_ids)[1]
    first = capture_gates(model, long_ids[: model.config.max_seq_len])[1]
    assert full.shape == (len(long_ids), 2)
    np.testing.assert_allclose(full[: len(first)], first, atol=1e-6)


# ---- the page in a browser -----------------------------------------------------------------------
def _chromium(*args: str, profile: Path) -> subprocess.CompletedProcess:
    return subprocess.run(
        [CHROMIUM, "--headless", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
         "--hide-scrollbars", f"--user-data-dir={profile}", *args],
        capture_output=True, text=True, timeout=90, check=True,
    )  # fmt: skip


@pytest.mark.skipif(CHROMIUM is None, reason="no chromium on PATH (apt-get install chromium)")
def test_page_in_headless_chromium(study: Path, tmp_path: Path):
    report = json.loads((study / "report.json").read_text())
    url = (study / "gates.html").resolve().as_uri()
    dom = _chromium("--dump-dom", url, profile=tmp_path / "profile").stdout
    parsed = _parse(dom)
    # The browser built one element per token, with its value, and the text stayed text.
    assert "b" not in parsed.tags, "token text was parsed as markup"
    assert len(parsed.rows) == len(report["texts"])  # one Engram layer per text
    for row, t in zip(parsed.rows, report["texts"], strict=True):
        assert len(row) == len(t["tokens"])
        assert "".join(text for _, text in row) == t["text"]
        assert [text for _, text in row] == t["tokens"]
        shown = [float(attrs["data-gate"]) for attrs, _ in row]
        np.testing.assert_allclose(shown, t["gates"]["1"], atol=2e-6)

    shot = tmp_path / "shot.png"
    _chromium("--screenshot=" + str(shot), "--window-size=1000,700", url, profile=tmp_path / "p2")
    _check_screenshot(shot, report)


def _check_screenshot(shot: Path, report: dict) -> None:
    """Coloured pixels in proportion to the tokens drawn, and both ends of the scale visible."""
    import matplotlib.image

    rgb = (matplotlib.image.imread(shot)[..., :3] * 255).round().astype(int)  # [H, W, 3]
    coloured = (rgb.max(axis=-1) - rgb.min(axis=-1)) > 40  # neither white, grey nor black
    chars = sum(len(t["text"].replace("\n", "").replace("\t", "    ")) for t in report["texts"])
    # A 14 px monospace cell is about 8.4 x 22 px = 185 px; glyphs cover part of it, the legend
    # bar adds about 4,600 px. Far fewer pixels: tokens not coloured; far more: colour leaks.
    per_char = (coloured.sum() - 4600) / chars
    assert 60 < per_char < 300, f"{coloured.sum()} coloured pixels for {chars} characters"
    values = [  # tokens with an area on the page: not a bare newline, not part of a character
        v
        for t in report["texts"]
        for v, piece in zip(t["gates"]["1"], t["tokens"], strict=True)
        if piece.strip("\n")
    ]
    lo, hi = report["colour_range"]
    for value in (min(values), max(values)):
        target = np.array([int(gate_colour(value, lo, hi)[i : i + 2], 16) for i in (1, 3, 5)])
        close = (np.abs(rgb - target).max(axis=-1) <= 3).sum()
        assert close > 50, f"the colour of gate {value:.4f} is not on the screenshot"
