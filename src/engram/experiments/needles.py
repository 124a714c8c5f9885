"""Key-value needles in corpus text: the long-context study's contexts and its exact scoring.

A needle is a Python assignment `KEY_4821 = "7392"`; its query, at the end of the context,
is the comparison `KEY_4821 == "` and the answer is the value's tokens `7392`. Both lines start
with the key, so that it is the same tokens in both: after `assert ` a byte-level BPE spells
`KEY` as ` K`, `E`, `Y`, and a small model would first have to learn that two spellings name
one key (no arm of the study's first design, which asked `assert KEY_4821 == "`, retrieved a
single value after 2.5M tokens).

Several needles sit in one block at a chosen depth (the fraction of the haystack, i.e. the
corpus text, before the block), and every needle is queried, in a shuffled order: the
multi-query needle-in-a-haystack of RULER (arXiv 2404.06654), which the Engram paper reports
at 32k tokens, written in the corpus's own language (Python source) so that a small BPE
tokenises it like any code.

Contexts are whole texts tokenised at once, as the trainer tokenises its documents, then cut
from the front to exactly `length` tokens (training windows start mid-document too). Where the
value tokens sit is found by tokenising the text up to each boundary and checking that those
ids are a prefix of the whole text's: every boundary used is a pre-token boundary of a
byte-level BPE (between `"` and a digit, after a line's single newline), and a tokenizer that
merges across one is refused rather than scored on misplaced spans.

Scoring is teacher-forced: the context and the query with its gold value run through the
model once, and a query counts as retrieved when the argmax at every value position is the
value's token. That is exactly whether greedy decoding from the query would emit the value's
tokens, at the cost of one forward pass for all queries of a context.

Legend: B contexts, T tokens, V vocabulary, K needles per context.
"""

from __future__ import annotations

import bisect
import itertools
import json
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from engram.tokenizer import Tokenizer

DIGITS = 4  # of a key's number and of a value: 10,000 of each, so guessing scores ~0
_TRIES = 50  # redraws of needles whose key or value the haystack happens to contain
_PASSES = 8  # of sizing a context's text before and after its needles (usually 2-3 suffice)


@dataclass(frozen=True)
class Needle:
    key: str  # e.g. "KEY_4821"
    value: str  # e.g. "7392"

    def assignment(self) -> str:
        return f'{self.key} = "{self.value}"\n'

    def query(self) -> str:
        """The query's text up to its answer (the value, then '"\\n', follow it)."""
        return f'{self.key} == "'


def draw_needles(rng: random.Random, count: int) -> list[Needle]:
    """`count` needles with distinct keys and distinct values, no value inside any key."""
    if count < 1:
        raise ValueError(f"needles={count} must be >= 1")
    numbers = rng.sample(range(10**DIGITS), 2 * count)  # distinct: keys and values never share
    keys, values = numbers[:count], numbers[count:]
    return [
        Needle(f"KEY_{k:0{DIGITS}d}", f"{v:0{DIGITS}d}") for k, v in zip(keys, values, strict=True)
    ]


def line_tokens(tok: Tokenizer, text: str) -> tuple[list[str], list[int]]:
    """The text's lines (with their newlines) and how many of the whole text's tokens start in
    each: its cost in context, where a newline may merge with the next line's indent."""
    lines = text.splitlines(keepends=True)
    ends = list(itertools.accumulate(len(line) for line in lines))
    counts = [0] * len(lines)
    for begin, _ in tok.backend.encode(text, add_special_tokens=False).offsets:
        counts[min(bisect.bisect_right(ends, begin), len(lines) - 1)] += 1
    return lines, counts


@dataclass(frozen=True)
class Filler:
    """Corpus lines, consecutive as in their documents, and each line's tokens in context."""

    lines: tuple[str, ...]
    tokens: tuple[int, ...]

    @classmethod
    def from_texts(cls, texts: Iterable[str], tok: Tokenizer, max_lines: int) -> Filler:
        lines: list[str] = []
        tokens: list[int] = []
        for text in texts:
            more, counts = line_tokens(tok, text if text.endswith("\n") else text + "\n")
            lines += more
            tokens += counts
            if len(lines) >= max_lines:
                break
        if not "".join(lines[:max_lines]).strip():
            raise ValueError("the corpus has no text to hide needles in")
        return cls(tuple(lines[:max_lines]), tuple(tokens[:max_lines]))

    def after(self, start: int, budget: float) -> str:
        """About `budget` tokens of text from line `start` on (wrapping): whole lines, then the
        part of the next line that fills the budget."""
        text, total = "", 0
        for i in range(start, start + len(self.lines)):
            line, cost = self.lines[i % len(self.lines)], self.tokens[i % len(self.lines)]
            if total + cost > budget:
                text += line[: int(len(line) * (budget - total) / cost)]
                break
            text, total = text + line, total + cost
        return _block(text)

    def backward(self, end: int, budget: float) -> list[int]:
        """Indices of the lines before `end` (wrapping), in text order, whose tokens reach at
        least `budget` (every line, at most)."""
        taken: list[int] = []
        total, i = 0, end - 1
        while total < budget and len(taken) < len(self.lines):
            total += self.tokens[i % len(self.lines)]
            taken.append(i % len(self.lines))
            i -= 1
        return taken[::-1]

    def text(self, indices: Sequence[int]) -> str:
        return _block("".join(self.lines[i] for i in indices))


def _block(text: str) -> str:
    """`text` ending in exactly one newline ("" for none): trailing blanks would merge with the
    newline into one pre-token and move a boundary (module doc)."""
    text = text.rstrip()
    return text + "\n" if text else ""


@dataclass(frozen=True)
class Composed:
    """A haystack with a block of needles, then their queries; character positions."""

    text: str
    needle_start: int  # where the first assignment begins
    query_start: int  # where the first query begins
    values: tuple[tuple[int, int], ...]  # each query's value [start, end), in query order
    order: tuple[int, ...]  # which needle each query asks for


def compose(before: str, needles: Sequence[Needle], after: str, order: Sequence[int]) -> Composed:
    """before + the needles' assignments + after + one query per needle in `order`."""
    head = before + "".join(n.assignment() for n in needles) + after
    text, values = head, []
    for i in order:
        text += needles[i].query()
        values.append((len(text), len(text) + len(needles[i].value)))
        text += needles[i].value + '"\n'
    return Composed(text, len(before), len(head), tuple(values), tuple(order))


def _unique(composed: Composed, needles: Sequence[Needle]) -> bool:
    """Each key and value occurs exactly once before the queries: the haystack contains no
    copy that could be retrieved instead (or by chance)."""
    head = composed.text[: composed.query_start]
    return all(head.count(n.key) == 1 and head.count(n.value) == 1 for n in needles)


def token_position(tok: Tokenizer, composed: Composed, ids: list[int], char: int) -> int:
    """How many of the whole text's `ids` come before character `char`; ValueError when the
    tokenizer merges across that boundary (the spans would be wrong)."""
    prefix = tok.encode(composed.text[:char])
    if ids[: len(prefix)] != prefix:
        left, right = composed.text[:char][-20:], composed.text[char : char + 20]
        raise ValueError(
            f"tokenizer {tok.name!r} merges tokens across a needle boundary ({left!r} | "
            f"{right!r}): the long-context probe needs a tokenizer that splits punctuation "
            "from digits and newlines from letters, as a byte-level BPE does"
        )
    return len(prefix)


# ---- contexts scored after training ----------------------------------------------------------
@dataclass(frozen=True)
class Probe:
    """One context of exactly `length` tokens and where each query's value sits in it."""

    ids: tuple[int, ...]
    values: tuple[tuple[int, int], ...]  # each query's value tokens [start, end), query order
    length: int
    target_depth: float
    depth: float  # measured: needle_start / haystack
    needle_start: int  # token index of the first assignment: the haystack tokens before it
    haystack: int  # tokens of corpus text (those of the needles' assignments left out)


def make_probe(
    tok: Tokenizer, filler: Filler, count: int, length: int, depth: float, rng: random.Random
) -> Probe:
    """A context of `length` tokens: corpus lines, `count` needles at `depth` of the haystack,
    then a query per needle in a random order; needles are redrawn until the haystack
    contains none of their keys or values."""
    if not 0.0 <= depth <= 1.0:
        raise ValueError(f"depth={depth} must be in [0, 1]")
    for _ in range(_TRIES):
        draw = (draw_needles(rng, count), rng.sample(range(count), count))
        probe = _fit(tok, filler, draw, rng.randrange(len(filler.lines)), length, depth)
        if probe is not None:
            return probe
    raise RuntimeError(f"no needles absent from the corpus text after {_TRIES} draws")


def _fit(
    tok: Tokenizer,
    filler: Filler,
    draw: tuple[list[Needle], list[int]],
    start: int,
    length: int,
    depth: float,
) -> Probe | None:
    """Text after the needles sized to (1 - depth) of the haystack, text before them grown
    until the whole holds >= `length` tokens, then cut from the front to exactly `length`;
    None when the haystack contains a key or a value. Each pass corrects the sizes by what
    the whole text's tokenisation measured."""
    needles, order = draw
    block = len(tok.encode("".join(n.assignment() for n in needles)))
    haystack = length - len(tok.encode(compose("", needles, "", order).text))
    if haystack < 1:
        raise ValueError(
            f"length {length} leaves no room for corpus text beside {len(needles)} needles and "
            "their queries: use longer lengths or fewer needles"
        )
    target = after_budget = (1.0 - depth) * haystack
    extra = 8.0  # tokens before the needles beyond the need, for the front cut
    best: tuple[float, Probe] | None = None
    for _ in range(_PASSES):
        before = filler.backward(start, haystack - after_budget + extra)
        composed = compose(filler.text(before), needles, filler.after(start, after_budget), order)
        if not _unique(composed, needles):
            return None
        ids = tok.encode(composed.text)
        first = token_position(tok, composed, ids, composed.needle_start)
        rest = len(ids) - first  # the needles, the text after them and the queries
        if rest > length:
            after_budget -= rest - length  # the text after the needles came out too long
            continue
        if first < length - rest:
            if len(before) == len(filler.lines):
                raise ValueError(f"the corpus text is too short for contexts of {length} tokens")
            extra += length - rest - first + 8
            continue
        after = token_position(tok, composed, ids, composed.query_start) - first - block
        if best is None or abs(after - target) < best[0]:
            best = (
                abs(after - target),
                _probe(tok, composed, ids, first - (length - rest), depth, block),
            )
        if best[0] <= 1.0:
            break
        after_budget += target - after  # tokens in context differ from the estimate
    if best is None:
        raise RuntimeError(f"no context of {length} tokens at depth {depth} in {_PASSES} passes")
    return best[1]


def _probe(
    tok: Tokenizer, composed: Composed, ids: list[int], cut: int, depth: float, block: int
) -> Probe:
    """The probe of `composed`'s tokens `ids` without the first `cut`; `block`: the needles'
    assignments' tokens, which the measured depth leaves out of the haystack."""
    spans = tuple(
        (token_position(tok, composed, ids, s) - cut, token_position(tok, composed, ids, e) - cut)
        for s, e in composed.values
    )
    first = token_position(tok, composed, ids, composed.needle_start) - cut
    queries = token_position(tok, composed, ids, composed.query_start) - cut
    return Probe(
        ids=tuple(ids[cut:]),
        values=spans,
        length=len(ids) - cut,
        target_depth=depth,
        depth=first / max(queries - block, 1),
        needle_start=first,
        haystack=queries - block,
    )


def probe_set(
    tok: Tokenizer,
    filler: Filler,
    lengths: Sequence[int],
    depths: Sequence[float],
    count: int,
    samples: int,
    seed: int,
) -> list[Probe]:
    """`samples` contexts for every (length, depth), the same for a given seed and corpus."""
    rng = random.Random(seed)
    return [
        make_probe(tok, filler, count, length, depth, rng)
        for length in lengths
        for depth in depths
        for _ in range(samples)
    ]


@torch.no_grad()
def score(logits: torch.Tensor, probes: Sequence[Probe]) -> list[list[tuple[bool, float]]]:
    """Per probe, per query: (exact, share of value tokens right) from logits [B, T, V] of the
    probes' ids [B, T].

    Exact: the argmax at every value position is the value's token (teacher-forced, so it is
    whether greedy decoding would emit the value). The token share gives partial credit, chance
    included (a digit token is right ~1/10 of the time by frequency alone)."""
    predicted = logits.argmax(dim=-1).cpu()  # [B, T]: position t predicts token t + 1
    results = []
    for b, probe in enumerate(probes):
        row = []
        for s, e in probe.values:
            got = predicted[b, s - 1 : e - 1].tolist()
            right = [g == w for g, w in zip(got, probe.ids[s:e], strict=True)]
            row.append((all(right), sum(right) / len(right)))
        results.append(row)
    return results


def run_probes(model, probes: Sequence[Probe], batch_size: int, device: torch.device) -> list:
    """Score every query of every probe with `model` (ids [B, T] -> logits [B, T, V]); one
    record per query: length, target and measured depth, exact, share of value tokens right."""
    records = []
    for length in sorted({p.length for p in probes}):
        group = [p for p in probes if p.length == length]
        for begin in range(0, len(group), batch_size):
            chunk = group[begin : begin + batch_size]
            ids = torch.tensor([p.ids for p in chunk], dtype=torch.int64, device=device)
            for probe, row in zip(chunk, score(model(ids), chunk), strict=True):
                records += [
                    {
                        "length": length,
                        "target_depth": probe.target_depth,
                        "depth": probe.depth,
                        "exact": exact,
                        "tokens": tokens,
                    }
                    for exact, tokens in row
                ]
    return records


# ---- the training corpus ---------------------------------------------------------------------
@dataclass(frozen=True)
class NeedleMix:
    """How needles enter the training corpus: pieces of `lengths` tokens of each document,
    a share `share` of them with `count` needles at a uniform depth and their queries."""

    count: int
    lengths: tuple[int, ...]
    share: float


def _pieces(
    lines: list[str], tokens: list[int], mix: NeedleMix, tok: Tokenizer, rng: random.Random
) -> Iterable[tuple[str, bool, int]]:
    """(text, with needles, estimated tokens) of consecutive pieces of one document."""
    i = 0
    while i < len(lines):
        length = rng.choice(mix.lengths)
        needles: list[Needle] = []
        fixed = 0  # tokens of the needles and their queries
        if rng.random() < mix.share:
            needles = draw_needles(rng, mix.count)
            order = rng.sample(range(mix.count), mix.count)
            fixed = len(tok.encode(compose("", needles, "", order).text))
        length -= fixed
        j, total = i + 1, tokens[i]
        while j < len(lines) and total + tokens[j] <= length:
            total, j = total + tokens[j], j + 1
        piece = lines[i:j]
        if needles:
            split = round(rng.random() * len(piece))  # the depth, in lines
            before, after = "".join(piece[:split]).rstrip(), "".join(piece[split:]).rstrip()
            composed = compose(
                before + "\n" if before else "", needles, after + "\n" if after else "", order
            )
            if _unique(composed, needles):
                yield composed.text, True, fixed + total
                i = j
                continue
        yield "".join(piece), False, total
        i = j


def _records(
    text: str, tok: Tokenizer, mix: NeedleMix, rng: random.Random
) -> Iterable[tuple[str, bool, int]]:
    """(text, with needles, tokens) of the corpus records one document becomes: each piece
    with needles alone, so that its queries end it; the plain pieces between them joined."""
    lines, tokens = line_tokens(tok, text)
    plain, plain_tokens = "", 0
    for piece, has_needles, n in _pieces(lines, tokens, mix, tok, rng):
        if not has_needles:
            plain, plain_tokens = plain + piece, plain_tokens + n
            continue
        if plain.strip():
            yield plain, False, plain_tokens
        plain, plain_tokens = "", 0
        yield piece, True, n
    if plain.strip():
        yield plain, False, plain_tokens


def write_training_corpus(
    path: Path, tok: Tokenizer, texts: Iterable[str], mix: NeedleMix, max_tokens: int, seed: int
) -> dict[str, int]:
    """A JSONL corpus (`{"text": ...}` per line) of `texts` cut into pieces, a share of them
    holding needles, until about `max_tokens` tokens; counts of what it holds."""
    rng = random.Random(seed)
    stats = {"documents": 0, "needle_documents": 0, "tokens": 0, "needle_tokens": 0}
    tmp = path.with_suffix(".tmp")
    with tmp.open("w", encoding="utf-8") as f:
        for text in texts:
            if stats["tokens"] >= max_tokens:
                break
            if not text.strip():
                continue
            for record, has_needles, n in _records(text, tok, mix, rng):
                f.write(json.dumps({"text": record}) + "\n")
                stats["documents"] += 1
                stats["needle_documents"] += has_needles
                stats["tokens"] += n
                stats["needle_tokens"] += n if has_needles else 0
                if stats["tokens"] >= max_tokens:
                    break
    tmp.replace(path)
    return stats
