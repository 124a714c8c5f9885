"""Packed batches for language-model training, with Engram's hash rows computed ahead of time.

The token stream of a shard (documents separated by EOS) is cut into fixed windows of T+1 tokens,
window i = tokens[i*T : i*T + T + 1]; inputs are its first T tokens, targets its last T. Windows
overlap by one token so that every token after the first is a target exactly once per epoch.

Windows ignore document boundaries. Inside a window the hasher's `doc_boundaries` (the spec's EOS
id) keeps N-grams from crossing an EOS. A window that starts mid-document sees pad before its first
token, exactly as at a sequence start: the few lost N-grams are the price of packing without
padding, and the model is trained the way it will be evaluated (fresh context at position 0).

Hashing ids into table rows (paper section 2.2) is a pure function of the ids, so it runs here, in
a background thread that keeps `prefetch` batches ready; torch ops release the GIL, so it overlaps
with the training step instead of sitting on its critical path.

Axes: B batch, T sequence length, H hash heads per Engram layer.
"""

from __future__ import annotations

import queue
import threading
import weakref
from collections.abc import Callable, Generator, Iterator
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from engram.hashing import NgramHasher

Hasher = NgramHasher | Callable[[torch.Tensor], dict[int, torch.Tensor]]
_POLL_SECONDS = 0.1  # how often a blocked thread checks whether it was asked to stop
_STATE_KEYS = ("epoch", "index", "seed", "shuffle", "seq_len", "batch_size", "n_windows")


@dataclass
class Batch:
    """One training (or evaluation) batch and where it sits in the stream."""

    ids: torch.Tensor  # [B, T] int64 inputs
    targets: torch.Tensor  # [B, T] int64, ids shifted left by one
    rows: dict[int, torch.Tensor] | None  # layer id -> [B, T, H] int64 rows, or None
    epoch: int
    index: int  # batch index within the epoch
    tokens_seen: int  # target tokens in this batch and every one before it


def _check_tokens(tokens: np.ndarray, seq_len: int, batch_size: int) -> np.ndarray:
    if seq_len < 1:
        raise ValueError(f"seq_len={seq_len} must be >= 1")
    if batch_size < 1:
        raise ValueError(f"batch_size={batch_size} must be >= 1")
    tokens = np.asarray(tokens)
    if tokens.ndim != 1 or not np.issubdtype(tokens.dtype, np.integer):
        raise ValueError(
            f"shard tokens must be a 1-D integer array, got {tokens.dtype} {list(tokens.shape)}"
        )
    if len(tokens) < seq_len + 1:
        raise ValueError(
            f"{len(tokens)} tokens are fewer than one window of seq_len+1={seq_len + 1}"
        )
    return tokens


def make_batch(
    tokens: np.ndarray,
    starts: np.ndarray,
    seq_len: int,
    hasher: Hasher | None,
    position: tuple[int, int, int] = (0, 0, 0),
) -> Batch:
    """The batch of the windows beginning at `starts` [B]; `position` = (epoch, index, seen)."""
    # Contiguous slices copy fast even from a memory map (fancy indexing would gather per id).
    windows = np.stack([tokens[s : s + seq_len + 1] for s in starts.tolist()])  # [B, T+1]
    windows = torch.from_numpy(windows.astype(np.int64))
    ids = windows[:, :-1].contiguous()  # [B, T]
    targets = windows[:, 1:].contiguous()  # [B, T]
    rows = hasher(ids) if hasher is not None else None
    return Batch(ids, targets, rows, *position)


class _Failure:
    """An exception raised in the prefetch thread, carried to the consumer."""

    def __init__(self, error: BaseException) -> None:
        self.error = error


class _Prefetcher:
    """A daemon thread computing batches from `start` on, `depth` ahead of the consumer."""

    def __init__(
        self,
        make: Callable[[int, int], Batch],
        advance: Callable[[tuple[int, int]], tuple[int, int]],
        start: tuple[int, int],
        depth: int,
    ) -> None:
        self._queue: queue.Queue[Batch | _Failure] = queue.Queue(maxsize=depth)
        self._stop = threading.Event()
        self._thread = threading.Thread(
            target=self._run, args=(make, advance, start), name="engram-prefetch", daemon=True
        )
        self._thread.start()

    def _run(self, make: Callable, advance: Callable, position: tuple[int, int]) -> None:
        try:
            while not self._stop.is_set():
                self._put(make(*position))
                position = advance(position)
        except BaseException as e:  # everything reaches the consumer, which re-raises it
            self._put(_Failure(e))

    def _put(self, item: Batch | _Failure) -> None:
        while not self._stop.is_set():
            try:
                self._queue.put(item, timeout=_POLL_SECONDS)
                return
            except queue.Full:
                continue

    def get(self) -> Batch | None:
        """The next batch; None once closed; re-raises what the thread raised."""
        while not self._stop.is_set():
            try:
                item = self._queue.get(timeout=_POLL_SECONDS)
            except queue.Empty:
                if not self._thread.is_alive() and self._queue.empty():
                    raise RuntimeError("the data loader's prefetch thread stopped") from None
                continue
            if isinstance(item, _Failure):
                raise item.error
            return item
        return None

    def close(self) -> None:
        self._stop.set()
        while not self._queue.empty():  # unblock a producer waiting on a full queue
            try:
                self._queue.get_nowait()
            except queue.Empty:
                break
        # A generator may be garbage collected on the worker itself; it cannot join itself.
        if threading.current_thread() is not self._thread:
            self._thread.join(timeout=10.0)


class PackedLoader:
    """Endless shuffled batches of packed windows, with prefetched hash rows and exact resume.

    Iterating yields batches forever, epoch after epoch; each epoch visits the windows in a
    permutation drawn from (seed, epoch), or in order with `shuffle=False`, and drops the windows
    of the last incomplete batch. `state_dict()` names the next batch the consumer will receive
    (not the next one prefetched), and `load_state_dict()` continues from exactly that batch.
    All iterators of one loader share its position; use one at a time. `prefetch=0` computes
    batches in the consumer's thread.

    Data parallel: with `world` > 1 each of the `world` ranks holds a loader with its `rank`;
    a global batch is `world x batch_size` windows and rank r yields rows [r*B, (r+1)*B) of it.
    So N ranks with batch B see exactly the batches one process with batch N x B sees, in the
    same order, and a position (`state_dict`, counted in global batches) resumes at any world
    size with the same global batch.
    """

    def __init__(
        self,
        shard_tokens: np.ndarray,
        seq_len: int,
        batch_size: int,
        hasher: Hasher | None = None,
        seed: int = 0,
        shuffle: bool = True,
        prefetch: int = 2,
        rank: int = 0,
        world: int = 1,
    ) -> None:
        if world < 1 or not 0 <= rank < world:
            raise ValueError(f"rank={rank} must be in [0, world={world})")
        self.rank, self.world = rank, world
        self.tokens = _check_tokens(shard_tokens, seq_len, batch_size * world)
        if prefetch < 0:
            raise ValueError(f"prefetch={prefetch} must be >= 0")
        if seed < 0:
            raise ValueError(f"seed={seed} must be >= 0")
        self.seq_len, self.batch_size, self.hasher = seq_len, batch_size, hasher
        self.seed, self.shuffle, self.prefetch = seed, shuffle, prefetch
        self.n_windows = (len(self.tokens) - 1) // seq_len
        self.global_batch = batch_size * world
        self.batches_per_epoch = self.n_windows // self.global_batch
        if self.batches_per_epoch == 0:
            raise ValueError(
                f"{len(self.tokens)} tokens make {self.n_windows} windows of seq_len={seq_len}, "
                f"fewer than one global batch of {world} x batch_size={batch_size}"
            )
        self._next = (0, 0)  # (epoch, index) of the next batch the consumer receives
        self._generation = 0  # bumped when the position jumps: running prefetchers are stale
        self._order_cache: tuple[int, int, np.ndarray] | None = None
        self._workers: weakref.WeakSet[_Prefetcher] = weakref.WeakSet()
        self._closed = False

    # ---- the stream ----------------------------------------------------------------------------
    def _order(self, seed: int, epoch: int) -> np.ndarray:
        """Window indices of one epoch; cached, as each batch of the epoch reads it."""
        cached = self._order_cache  # one read: the worker thread may replace it meanwhile
        if cached is not None and cached[:2] == (seed, epoch):
            return cached[2]
        if self.shuffle:
            order = np.random.default_rng([seed, epoch]).permutation(self.n_windows)
        else:
            order = np.arange(self.n_windows)
        self._order_cache = (seed, epoch, order)
        return order

    def batch_at(self, epoch: int, index: int) -> Batch:
        """The `index`-th batch of `epoch` (a pure function of the loader's settings)."""
        if epoch < 0 or not 0 <= index < self.batches_per_epoch:
            raise ValueError(
                f"batch (epoch={epoch}, index={index}) is outside [0, {self.batches_per_epoch})"
            )
        G, B = self.global_batch, self.batch_size
        first = index * G + self.rank * B  # this rank's rows of the global batch
        windows = self._order(self.seed, epoch)[first : first + B]
        seen = (epoch * self.batches_per_epoch + index + 1) * G * self.seq_len  # every rank's
        starts = windows * self.seq_len
        return make_batch(self.tokens, starts, self.seq_len, self.hasher, (epoch, index, seen))

    def _advance(self, position: tuple[int, int]) -> tuple[int, int]:
        epoch, index = position
        return (epoch + 1, 0) if index + 1 == self.batches_per_epoch else (epoch, index + 1)

    def _start_worker(self) -> _Prefetcher | None:
        if self.prefetch == 0:
            return None
        worker = _Prefetcher(self.batch_at, self._advance, self._next, self.prefetch)
        self._workers.add(worker)
        return worker

    def __iter__(self) -> Iterator[Batch]:
        return self._stream()

    def _stream(self) -> Generator[Batch, None, None]:
        if self._closed:
            raise ValueError("this PackedLoader is closed")
        generation, worker = self._generation, self._start_worker()
        try:
            while not self._closed:
                if generation != self._generation:  # load_state_dict moved the position
                    generation, worker = self._restart(worker)
                batch = worker.get() if worker is not None else self.batch_at(*self._next)
                if batch is None:  # closed meanwhile
                    return
                if (batch.epoch, batch.index) != self._next:
                    # Another iterator of this loader consumed batches: its prefetch is stale.
                    generation, worker = self._restart(worker)
                    continue
                self._next = self._advance(self._next)
                yield batch
        finally:  # also runs when the generator is closed or garbage collected
            if worker is not None:
                worker.close()

    def _restart(self, worker: _Prefetcher | None) -> tuple[int, _Prefetcher | None]:
        if worker is not None:
            worker.close()
        return self._generation, self._start_worker()

    def batches(self, n: int) -> list[Batch]:
        """The next `n` batches (the position advances by `n`); for training, iterate instead."""
        if n < 0:
            raise ValueError(f"n={n} must be >= 0")
        stream = self._stream()
        try:
            return [next(stream) for _ in range(n)]
        finally:
            stream.close()

    # ---- resume --------------------------------------------------------------------------------
    def state_dict(self, after: Batch | None = None) -> dict[str, Any]:
        """JSON-able position of the next batch to be consumed, with the loader's geometry
        (`batch_size` is the global batch: the same state serves every world size).

        `after`: the position right after that batch instead, for a consumer that reads ahead
        (the trainer's table prefetch holds batches the model has not trained on yet).
        """
        epoch, index = self._next if after is None else self._advance((after.epoch, after.index))
        return {
            "epoch": epoch,
            "index": index,
            "seed": self.seed,
            "shuffle": self.shuffle,
            "seq_len": self.seq_len,
            "batch_size": self.global_batch,
            "n_windows": self.n_windows,
        }

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue with exactly the batch `state` names (the seed is taken from `state`)."""
        missing = [k for k in _STATE_KEYS if k not in state]
        if missing:
            raise ValueError(f"loader state is missing {missing}")
        mine = self.state_dict()
        differ = [
            k for k in ("shuffle", "seq_len", "batch_size", "n_windows") if state[k] != mine[k]
        ]
        if differ:
            raise ValueError(
                "loader state was saved with a different "
                + ", ".join(f"{k} ({state[k]!r}, this loader has {mine[k]!r})" for k in differ)
                + ": an exact resume needs the same data, seq_len, batch_size and shuffle"
            )
        epoch, index, seed = int(state["epoch"]), int(state["index"]), int(state["seed"])
        if epoch < 0 or not 0 <= index < self.batches_per_epoch or seed < 0:
            raise ValueError(f"loader state epoch={epoch}, index={index}, seed={seed} is invalid")
        self.seed, self._next = seed, (epoch, index)
        self._generation += 1

    # ---- lifetime ------------------------------------------------------------------------------
    def close(self) -> None:
        """Stop every prefetch thread; iterators of a closed loader end."""
        self._closed = True
        for worker in list(self._workers):
            worker.close()

    def __enter__(self) -> PackedLoader:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


def eval_batches(
    shard_tokens: np.ndarray,
    seq_len: int,
    batch_size: int,
    hasher: Hasher | None = None,
    max_tokens: int | None = None,
) -> Iterator[Batch]:
    """In-order, non-overlapping batches over the first `max_tokens` tokens (all by default).

    Window i = tokens[i*T : i*T+T+1], so the targets cover tokens[1 : n*T+1] exactly once; the
    last batch may hold fewer than `batch_size` rows, and at most T trailing tokens go unscored.
    Every model evaluated this way sees the same tokens, so validation losses compare.
    """
    tokens = np.asarray(shard_tokens)
    if max_tokens is not None:
        if max_tokens < 1:
            raise ValueError(f"max_tokens={max_tokens} must be >= 1")
        tokens = tokens[:max_tokens]
    tokens = _check_tokens(tokens, seq_len, batch_size)
    return _eval_stream(tokens, seq_len, batch_size, hasher)


def _eval_stream(
    tokens: np.ndarray, seq_len: int, batch_size: int, hasher: Hasher | None
) -> Iterator[Batch]:
    starts = np.arange((len(tokens) - 1) // seq_len) * seq_len
    seen = 0
    for index, begin in enumerate(range(0, len(starts), batch_size)):
        chunk = starts[begin : begin + batch_size]
        seen += len(chunk) * seq_len
        yield make_batch(tokens, chunk, seq_len, hasher, (0, index, seen))
