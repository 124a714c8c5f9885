"""Token kinds of a source-code stream, for the sensitivity test of switching Engram off by kind.

The paper switches Engram off at inference and finds that factual recall keeps only 29-44% of its
score while reading comprehension keeps 81-93%: the memory serves some kinds of prediction far more
than others. Our corpus is Python source, so the kinds here are lexical, read from Python's own
lexer (`tokenize`) run over each decoded document, and attributed to each tokenizer piece by the
first non-blank character it holds:

    keyword       a Python keyword (def, return, if ...)
    name-start    the piece that begins an identifier
    name-cont     a later piece of a split identifier ("_bar" in "foo" "_bar")
    number        a numeric literal
    operator      punctuation and operators
    string        inside a string literal (docstrings included), its quotes too
    comment       inside a comment
    whitespace    a piece of only blanks outside strings and comments: newlines, indentation
    other         what the lexer gave nothing for (and the document separator)

Where the lexer stops (a document cut short by the evaluation window, or text that is not Python)
a character heuristic takes over: digits are numbers, word characters are name-start or name-cont
by the character before them, other printable ASCII is an operator. Independently of the lexer,
every piece is also a `word-start`, a `word-cont` (a word character right after another: the
piece continues a word, where its N-gram says the most) or `non-word`.

Entity-final pieces (`entity_final_stream`), the positions the paper's CKA analysis reads: the
piece holding the last character of an identifier (a NAME token that is not a keyword) or of a
string literal (its closing quote; an f-string's end on Python >= 3.12), i.e. where a multi-piece
entity is complete. Only what the lexer read counts (no heuristic: an entity must have an end).

Axes: N stream tokens.
"""

from __future__ import annotations

import io
import keyword
import re
import string
import tokenize
from collections.abc import Iterator
from typing import Any

import numpy as np

from engram.tokenizer import Tokenizer

KINDS = (
    "keyword",
    "name-start",
    "name-cont",
    "number",
    "operator",
    "string",
    "comment",
    "whitespace",
    "other",
)
WORDS = ("word-start", "word-cont", "non-word")
_K = {name: i for i, name in enumerate(KINDS)}
# Character contexts from the lexer: 0 = unknown (the heuristic decides).
_NAME, _KEYWORD, _NUMBER, _OP, _STRING, _COMMENT = range(1, 7)
_CONTEXT_KIND = {
    _KEYWORD: _K["keyword"],
    _NUMBER: _K["number"],
    _OP: _K["operator"],
    _STRING: _K["string"],
    _COMMENT: _K["comment"],
}
_TYPES = {
    tokenize.NAME: _NAME,
    tokenize.NUMBER: _NUMBER,
    tokenize.OP: _OP,
    tokenize.STRING: _STRING,
    tokenize.COMMENT: _COMMENT,
}
for _name in ("FSTRING_START", "FSTRING_MIDDLE", "FSTRING_END"):  # Python >= 3.12 splits f-strings
    if hasattr(tokenize, _name):
        _TYPES[getattr(tokenize, _name)] = _STRING
_OPERATOR_CHARS = frozenset(string.punctuation)
# Lexer tokens that end a string literal: an f-string's start and middle (Python >= 3.12) do not.
_LITERAL_ENDS = frozenset(
    getattr(tokenize, name) for name in ("STRING", "FSTRING_END") if hasattr(tokenize, name)
)


def _is_word(ch: str) -> bool:
    return ch.isalnum() or ch == "_"


def piece_texts(tok: Tokenizer) -> list[str]:
    """The text of every token id decoded alone (a split UTF-8 character decodes as U+FFFD)."""
    return [tok.decode([i]) for i in range(tok.vocab_size)]


def _line_starts(text: str) -> list[int]:
    return [0] + [m.end() for m in re.finditer("\n", text)]  # readline splits at \n only


def _lexed(text: str, line_starts: list[int]) -> Iterator[tuple[int, int, int, int]]:
    """(context code, lexer type, first character, end character) of each classified lexer token
    of `text`; raises the lexer's TokenError or SyntaxError where it stops."""
    for t in tokenize.generate_tokens(io.StringIO(text).readline):
        code = _TYPES.get(t.type)
        if code is None:
            continue
        if code == _NAME and keyword.iskeyword(t.string):
            code = _KEYWORD
        begin = line_starts[t.start[0] - 1] + t.start[1]
        yield code, t.type, begin, line_starts[t.end[0] - 1] + t.end[1]


def char_contexts(text: str) -> tuple[np.ndarray, np.ndarray]:
    """Per character of `text`: the lexer's context code [C] and whether a name starts there [C]."""
    ctx = np.zeros(len(text), dtype=np.int8)
    name_start = np.zeros(len(text), dtype=bool)
    line_starts = _line_starts(text)
    try:
        for code, _, begin, end in _lexed(text, line_starts):
            ctx[begin:end] = code
            if code == _NAME:
                name_start[begin] = True
    except tokenize.TokenError as e:  # a cut-short document: what was lexed stays classified
        if "string" in str(e.args[0]) and len(e.args) > 1:  # ended inside a multi-line string
            row, col = e.args[1]
            ctx[line_starts[row - 1] + col :] = _STRING
    except SyntaxError:
        pass  # e.g. an inconsistent dedent: the heuristic takes the rest of the document
    return ctx, name_start


def _kind(piece: str, first: int, text: str, ctx: np.ndarray, name_start: np.ndarray) -> int:
    """The kind of a piece whose first non-blank character is text[first]."""
    code = int(ctx[first])
    if code == _NAME:
        return _K["name-start"] if name_start[first] else _K["name-cont"]
    if code:
        return _CONTEXT_KIND[code]
    ch = text[first]
    if ch.isdigit():
        return _K["number"]
    if _is_word(ch):
        return _K["name-cont"] if first > 0 and _is_word(text[first - 1]) else _K["name-start"]
    return _K["operator"] if ch in _OPERATOR_CHARS else _K["other"]


def classify_document(pieces: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Kind (index into KINDS) and word position (index into WORDS) of each piece [n]."""
    text = "".join(pieces)
    ctx, name_start = char_contexts(text)
    kinds = np.full(len(pieces), _K["other"], dtype=np.int8)
    words = np.full(len(pieces), WORDS.index("non-word"), dtype=np.int8)
    pos = 0
    for i, piece in enumerate(pieces):
        stripped = piece.lstrip()
        if piece and not stripped:  # blanks inside a string or comment belong to it
            inside = _CONTEXT_KIND.get(int(ctx[pos]), -1) in (_K["string"], _K["comment"])
            kinds[i] = _CONTEXT_KIND[int(ctx[pos])] if inside else _K["whitespace"]
        elif stripped:
            first = pos + len(piece) - len(stripped)
            kinds[i] = _kind(piece, first, text, ctx, name_start)
            if _is_word(text[first]):
                cont = first > 0 and _is_word(text[first - 1])
                words[i] = WORDS.index("word-cont" if cont else "word-start")
        pos += len(piece)
    return kinds, words


def classify_pieces(pieces: list[str]) -> list[str]:
    """Kind names of one document's pieces (for inspection and tests)."""
    return [KINDS[k] for k in classify_document(pieces)[0]]


def _documents(tokens: np.ndarray, eos_id: int | None) -> Iterator[tuple[int, int]]:
    """[begin, end) of each non-empty document of a stream split at EOS (the EOS in neither)."""
    ends = np.flatnonzero(tokens == eos_id) if eos_id is not None else np.zeros(0, dtype=np.int64)
    begin = 0
    for end in [*ends.tolist(), len(tokens)]:
        if end > begin:
            yield begin, end
        begin = end + 1


def classify_stream(
    tokens: np.ndarray, pieces: list[str], eos_id: int | None
) -> tuple[np.ndarray, np.ndarray]:
    """Kinds [N] and word positions [N] of a token stream, document by document (split at EOS)."""
    tokens = np.asarray(tokens, dtype=np.int64)
    # The EOS itself stays "other" / "non-word".
    kinds = np.full(len(tokens), _K["other"], dtype=np.int8)
    words = np.full(len(tokens), WORDS.index("non-word"), dtype=np.int8)
    for begin, end in _documents(tokens, eos_id):
        k, w = classify_document([pieces[t] for t in tokens[begin:end].tolist()])
        kinds[begin:end], words[begin:end] = k, w
    return kinds, words


def entity_final_document(pieces: list[str]) -> np.ndarray:
    """Whether each piece [n] ends an identifier or a string literal (see the module docstring).

    A piece is chosen by the entity's last character: a piece that closes a string and opens a
    bracket (`")`) counts, a blank piece never (an entity ends on a visible character).
    """
    text = "".join(pieces)
    ends = []
    try:
        for code, kind, _, end in _lexed(text, _line_starts(text)):
            if code == _NAME or kind in _LITERAL_ENDS:
                ends.append(end - 1)
    except (tokenize.TokenError, SyntaxError):
        pass  # a document cut short: the entities lexed before keep their ends
    starts = np.cumsum([0, *map(len, pieces)])[:-1]  # [n] first character of each piece
    chosen = np.zeros(len(pieces), dtype=bool)
    # The piece whose span holds the character: the last piece starting at or before it
    # (empty pieces, e.g. undecodable bytes, share a start with the next and are never picked).
    chosen[np.searchsorted(starts, np.asarray(ends, dtype=np.int64), side="right") - 1] = True
    return chosen


def entity_final_stream(tokens: np.ndarray, pieces: list[str], eos_id: int | None) -> np.ndarray:
    """Entity-final mask [N] of a token stream, document by document (split at EOS)."""
    tokens = np.asarray(tokens, dtype=np.int64)
    chosen = np.zeros(len(tokens), dtype=bool)
    for begin, end in _documents(tokens, eos_id):
        chosen[begin:end] = entity_final_document([pieces[t] for t in tokens[begin:end].tolist()])
    return chosen


def group_table(
    groups: np.ndarray, names: tuple[str, ...], losses: dict[str, np.ndarray], unigram: np.ndarray
) -> list[dict[str, Any]]:
    """Per group (and "all"): token count, mean loss per variant, increase and retained share.

    increase = loss off - loss on. retained = (unigram - off) / (unigram - on): the share of the
    model's gain over a context-free unigram predictor that survives switching Engram off (1: the
    memory was not needed, 0: without it the model is back at the unigram); None where the model
    does not beat the unigram on that group.
    """
    scored = np.isfinite(losses["on"])
    total = int(scored.sum())
    rows = []
    for g, name in [*enumerate(names), (-1, "all")]:
        mask = scored & ((groups == g) if g >= 0 else True)
        n = int(mask.sum())
        row: dict[str, Any] = {"kind": name, "tokens": n, "share": n / total if total else 0.0}
        means = {v: float(a[mask].mean()) if n else None for v, a in losses.items()}
        row.update({f"loss_{v}": m for v, m in means.items()})
        row["loss_unigram"] = float(unigram[mask].mean()) if n else None
        on, off, uni = means["on"], means.get("off"), row["loss_unigram"]
        row["increase"] = None if on is None or off is None else off - on
        gain = None if on is None else uni - on
        row["retained"] = (uni - off) / gain if gain and gain > 0 and off is not None else None
        rows.append(row)
    return rows


__all__ = [
    "KINDS",
    "WORDS",
    "char_contexts",
    "classify_document",
    "classify_pieces",
    "classify_stream",
    "entity_final_document",
    "entity_final_stream",
    "group_table",
    "piece_texts",
]
