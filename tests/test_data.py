"""Data pipeline: sources and their splits, cached token shards, the packed prefetching loader."""

from __future__ import annotations

import gc
import importlib.util
import json
import threading
from collections import Counter

import numpy as np
import pytest
import torch
from tokenizers import Tokenizer as HFTokenizer
from tokenizers import models

from engram.data import (
    PackedLoader,
    build_shard,
    documents,
    eval_batches,
    read_texts,
    source_fingerprint,
    stdlib_files,
    token_dtype,
)
from engram.data.sources import canonical_source, package_files
from engram.hashing import NgramHasher
from engram.spec import resolve
from engram.tokenizer import Tokenizer, train_bpe
from engram.vocab import compress


# ---- fixtures ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return train_bpe(read_texts(stdlib_files("train", max_files=5)), vocab_size=300)


@pytest.fixture(scope="module")
def hasher(tok: Tokenizer) -> NgramHasher:
    vocab = compress(tok, use_cache=False)
    spec = resolve("tiny", tokenizer=tok, vocab=vocab, pad_id=tok.pad_id)
    return NgramHasher(spec, vocab)


@pytest.fixture
def cache(tmp_path, monkeypatch):
    monkeypatch.setenv("ENGRAM_CACHE_DIR", str(tmp_path / "cache"))
    return tmp_path / "cache"


def make_folder(root, n=30):
    """A folder of n small text files with mixed suffixes, plus files that must be ignored."""
    suffixes = [".txt", ".md", ".py", ".rst"]
    for i in range(n):
        path = root / f"sub{i % 3}" / f"doc{i:02d}{suffixes[i % 4]}"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(f"document {i}\n" + "def f(x):\n    return x + 1\n" * (i % 5 + 1))
    (root / "image.bin").write_bytes(b"\x00\xff" * 10)
    (root / "notes.json").write_text('{"not": "text"}')
    return root


def without_encode_batch(tokenizer, monkeypatch):
    """Make re-tokenising impossible: a cache hit must not call encode_batch."""

    def fail(texts):
        raise AssertionError("encode_batch called: the shard was tokenised again")

    monkeypatch.setattr(tokenizer, "encode_batch", fail)


def prefetch_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name == "engram-prefetch" and t.is_alive()]


# ---- sources ----------------------------------------------------------------------------------
def test_stdlib_split_is_disjoint_and_deterministic():
    train, val = stdlib_files("train"), stdlib_files("val")
    assert train and val and not set(train) & set(val)
    assert stdlib_files("val") == val  # same call, same files, same order
    # "default" is an alias of "stdlib": both read exactly the val files, in order.
    docs = list(documents("default", "val"))
    assert docs == list(documents("stdlib", "val")) == [d for d in read_texts(val) if d]


def test_text_folder_split_is_a_partition(tmp_path):
    folder = make_folder(tmp_path / "corpus")
    train, val = list(documents(str(folder), "train")), list(documents(str(folder), "val"))
    assert train and val
    text_files = [p for p in folder.rglob("*") if p.suffix in (".txt", ".md", ".py", ".rst")]
    everything = [p.read_text() for p in text_files]  # .bin and .json files are left out
    assert len(everything) == 30
    assert Counter(train + val) == Counter(everything)
    assert list(documents(str(folder), "train")) == train  # deterministic


def test_tiny_folder_still_gets_a_val_document(tmp_path):
    for name in ("a.txt", "b.txt"):
        (tmp_path / name).write_text(f"only {name}\n")
    train, val = list(documents(str(tmp_path), "train")), list(documents(str(tmp_path), "val"))
    assert len(train) == 1 and len(val) == 1 and train != val


def test_single_text_file_splits_into_line_blocks(tmp_path):
    path = tmp_path / "book.txt"
    lines = [f"line {i} of the book\n" for i in range(3000)]
    path.write_text("".join(lines))
    train, val = list(documents(str(path), "train")), list(documents(str(path), "val"))
    assert train and val
    assert all(block.endswith("\n") for block in train + val)  # cut at line boundaries only
    got = Counter(line for block in train + val for line in block.splitlines(keepends=True))
    assert got == Counter(lines)


def test_jsonl_with_a_named_field(tmp_path):
    path = tmp_path / "data.jsonl"
    records = [{"body": f"record {i}", "id": i} for i in range(60)]
    path.write_text("\n".join(json.dumps(r) for r in records[:30]) + "\n\n")  # a blank line
    with path.open("a") as f:
        f.write("\n".join(json.dumps(r) for r in records[30:]) + "\n")
    source = f"{path}:body"
    train, val = list(documents(source, "train")), list(documents(source, "val"))
    assert train and val and not set(train) & set(val)
    assert sorted(train + val) == sorted(r["body"] for r in records)
    with pytest.raises(ValueError, match="no string field 'text'"):
        list(documents(str(path), "train"))  # default field "text" is absent


def test_packages_corpus_is_the_pinned_distributions_sources():
    every = package_files()
    train, val = package_files("train"), package_files("val")
    assert len(every) > 1000 and {p.suffix for p in every} == {".py"}  # torch alone has thousands
    assert sorted(train + val) == sorted(every) and not set(train) & set(val)
    assert 0.02 < len(val) / len(every) < 0.08
    assert canonical_source("packages") == "packages"
    assert source_fingerprint("packages") == source_fingerprint("packages")
    first = next(documents("packages", "val"))  # the first non-empty val file, whole
    assert first in {p.read_text(encoding="utf-8", errors="replace") for p in val[:100]}


def test_parquet_rows_are_documents_split_like_jsonl_records(tmp_path):
    pa = pytest.importorskip("pyarrow")
    pq = pytest.importorskip("pyarrow.parquet")
    bodies = [f"row {i}: " + "x" * (i % 7) for i in range(5000)]  # several read batches
    path = tmp_path / "data.parquet"
    pq.write_table(pa.table({"body": bodies, "id": list(range(5000))}), path, row_group_size=999)
    source = f"{path}:body"
    train, val = list(documents(source, "train")), list(documents(source, "val"))
    assert train and val and not set(train) & set(val)
    assert sorted(train + val) == sorted(bodies)
    # The same split as the same records in JSONL: a record's index decides, not its format.
    jsonl = tmp_path / "data.jsonl"
    jsonl.write_text("".join(json.dumps({"body": b}) + "\n" for b in bodies))
    assert list(documents(f"{jsonl}:body", "val")) == val
    with pytest.raises(ValueError, match="no column 'text'"):
        list(documents(str(path), "train"))
    (tmp_path / "junk.parquet").write_bytes(b"not parquet")
    with pytest.raises(ValueError, match="not a readable Parquet file"):
        list(documents(str(tmp_path / "junk.parquet"), "train"))


def test_jsonl_bad_line_names_its_line_number(tmp_path):
    path = tmp_path / "bad.jsonl"
    path.write_text('{"text": "fine"}\n{oops\n' * 40)
    with pytest.raises(ValueError, match=r"bad\.jsonl:\d+: not valid JSON"):
        list(documents(str(path), "train"))


def test_unknown_or_missing_sources_are_clear_errors(tmp_path):
    with pytest.raises(ValueError, match="unknown data source 'no/such/place'"):
        documents("no/such/place", "train")
    with pytest.raises(ValueError, match=r"missing\.jsonl"):
        documents(str(tmp_path / "missing.jsonl:body"), "train")
    with pytest.raises(ValueError, match="split='test'"):
        documents("stdlib", "test")
    with pytest.raises(ValueError, match="hf:NAME"):
        documents("hf:name:train:text:extra", "train")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match=r"no \.txt/\.md/\.py/\.rst files"):
        documents(str(tmp_path / "empty"), "train")


def test_hf_source_never_downloads():
    if importlib.util.find_spec("datasets") is None:
        expected = "pip install datasets"  # the package is missing: say how to get it
    else:
        expected = "not available locally"  # offline: an absent dataset is an error, not a fetch
    with pytest.raises(ValueError, match=expected):
        documents("hf:nobody/no-such-dataset-xyz", "train")


def test_a_saved_datasets_folder_is_a_source(tmp_path):
    """`hf:FOLDER` reads a `datasets` `save_to_disk` folder: rows are documents, split by index."""
    datasets = pytest.importorskip("datasets")
    bodies = [f"document {i}: " + "word " * (i % 13) for i in range(300)]
    folder = tmp_path / "saved"
    datasets.Dataset.from_dict({"text": bodies, "id": list(range(300))}).save_to_disk(folder)
    train, val = list(documents(f"hf:{folder}", "train")), list(documents(f"hf:{folder}", "val"))
    assert train and val and sorted(train + val) == sorted(bodies)
    assert canonical_source(f"hf:{folder}") == f"hf:{folder.resolve()}:train:text"
    assert source_fingerprint(f"hf:{folder}") == source_fingerprint(f"hf:{folder}")


def test_source_fingerprint_follows_the_files(tmp_path):
    folder = make_folder(tmp_path / "corpus", n=4)
    before = source_fingerprint(str(folder))
    assert source_fingerprint(str(folder)) == before
    (folder / "sub0" / "doc00.txt").write_text("edited, and longer than before\n")
    assert source_fingerprint(str(folder)) != before
    assert source_fingerprint("default") == source_fingerprint("stdlib")


# ---- token shards -----------------------------------------------------------------------------
def test_shard_holds_every_document_then_eos(tmp_path, cache, tok):
    folder = str(make_folder(tmp_path / "corpus"))
    shard = build_shard(folder, "train", tok)
    docs = list(documents(folder, "train"))
    expected = [i for doc in docs for i in [*tok.encode(doc), tok.eos_id]]
    assert shard.tokens.dtype == np.uint16 and shard.n_docs == len(docs)
    assert shard.tokens.tolist() == expected and shard.n_tokens == len(expected)
    assert int((shard.tokens == tok.eos_id).sum()) == len(docs)
    assert not shard.tokens.flags.writeable  # a read-only memory map
    assert shard.meta["tokenizer_fingerprint"] == tok.fingerprint
    assert shard.meta["split"] == "train" and shard.meta["dtype"] == "uint16"
    assert shard.path.parent.parent == cache / "shards"


def test_second_build_is_a_cache_hit(tmp_path, cache, tok, monkeypatch):
    folder = str(make_folder(tmp_path / "corpus"))
    first = build_shard(folder, "val", tok)
    without_encode_batch(tok, monkeypatch)
    second = build_shard(folder, "val", tok)
    assert np.array_equal(first.tokens, second.tokens) and second.meta == first.meta


def test_corrupt_meta_or_changed_source_rebuilds(tmp_path, cache, tok):
    folder = make_folder(tmp_path / "corpus")
    first = build_shard(str(folder), "train", tok)
    first.path.with_suffix(".json").write_text("{not json")
    rebuilt = build_shard(str(folder), "train", tok)
    assert np.array_equal(rebuilt.tokens, first.tokens)
    for path in folder.rglob("*.txt"):
        path.write_text("completely different text\n")
    changed = build_shard(str(folder), "train", tok)
    assert (
        changed.path != first.path
        and changed.meta["source_fingerprint"] != (first.meta["source_fingerprint"])
    )


def test_token_dtype_uint16_or_uint32(tmp_path, cache, deepseek):
    assert token_dtype(300) == np.uint16 and token_dtype(65536) == np.uint16
    assert token_dtype(65537) == np.uint32
    (tmp_path / "a.txt").write_text("hello world\n" * 200)
    shard = build_shard(str(tmp_path / "a.txt"), "train", deepseek)  # 129,280 ids
    assert shard.tokens.dtype == np.uint32 and shard.tokens[-1] == deepseek.eos_id


def test_shard_errors(tmp_path, cache, tok):
    (tmp_path / "a.txt").write_text("some text\n" * 100)
    plain = Tokenizer(HFTokenizer(models.BPE()), "no-eos")
    with pytest.raises(ValueError, match="has no EOS id"):
        build_shard(str(tmp_path / "a.txt"), "train", plain)
    with pytest.raises(ValueError, match="split='dev'"):
        build_shard(str(tmp_path / "a.txt"), "dev", tok)
    (tmp_path / "one.txt").write_text("a single line\n")
    with pytest.raises(ValueError, match=r"split 'val' .* has no documents"):
        build_shard(str(tmp_path / "one.txt"), "val", tok)


# ---- the loader -------------------------------------------------------------------------------
def arange_tokens(n=1000):
    """Token i is i, so a window's first id names where it starts."""
    return np.arange(n, dtype=np.uint32)


def test_batches_are_windows_and_targets_shift_by_one():
    tokens = arange_tokens()
    with PackedLoader(tokens, seq_len=16, batch_size=4, seed=0) as loader:
        batches = loader.batches(3)
    for batch in batches:
        assert batch.ids.shape == batch.targets.shape == (4, 16)
        assert batch.ids.dtype == batch.targets.dtype == torch.int64 and batch.rows is None
        assert torch.equal(batch.targets[:, :-1], batch.ids[:, 1:])
        for row in batch.ids.tolist():
            assert row[0] % 16 == 0 and row == list(range(row[0], row[0] + 16))
    assert [b.tokens_seen for b in batches] == [64, 128, 192]


def test_each_epoch_is_a_seeded_permutation_of_windows():
    tokens = arange_tokens(16 * 41 + 1)  # 41 windows: 10 batches of 4, one window dropped
    loader = PackedLoader(tokens, seq_len=16, batch_size=4, seed=3, prefetch=0)
    assert loader.n_windows == 41 and loader.batches_per_epoch == 10
    epochs = [loader.batches(10), loader.batches(10)]
    starts = [[s // 16 for b in e for s in b.ids[:, 0].tolist()] for e in epochs]
    assert all(len(set(s)) == 40 for s in starts) and starts[0] != starts[1]
    assert [b.epoch for b in epochs[1]] == [1] * 10
    again = PackedLoader(tokens, seq_len=16, batch_size=4, seed=3).batches(10)
    assert all(torch.equal(a.ids, b.ids) for a, b in zip(again, epochs[0], strict=True))
    other = PackedLoader(tokens, seq_len=16, batch_size=4, seed=4).batches(10)
    assert any(not torch.equal(a.ids, b.ids) for a, b in zip(other, epochs[0], strict=True))
    ordered = PackedLoader(tokens, seq_len=16, batch_size=4, shuffle=False).batches(2)
    assert [s // 16 for b in ordered for s in b.ids[:, 0].tolist()] == list(range(8))


def same_batches(a, b):
    return len(a) == len(b) and all(
        torch.equal(x.ids, y.ids)
        and torch.equal(x.targets, y.targets)
        and (x.epoch, x.index, x.tokens_seen) == (y.epoch, y.index, y.tokens_seen)
        for x, y in zip(a, b, strict=True)
    )


def test_resume_continues_with_exactly_the_next_batch():
    tokens = arange_tokens(16 * 20 + 1)  # 5 batches per epoch: the run crosses epochs
    loader = PackedLoader(tokens, seq_len=16, batch_size=4, seed=7, prefetch=3)
    stream = iter(loader)
    [next(stream) for _ in range(7)]  # the prefetcher is now ahead of the consumer
    state = json.loads(json.dumps(loader.state_dict()))
    assert (state["epoch"], state["index"]) == (1, 2)
    expected = [next(stream) for _ in range(6)]
    resumed = PackedLoader(tokens, seq_len=16, batch_size=4, seed=0, prefetch=3)
    resumed.load_state_dict(state)  # takes the seed from the state
    assert same_batches(resumed.batches(6), expected)
    loader.load_state_dict(state)  # rewinding the live iterator works too
    assert same_batches([next(stream) for _ in range(6)], expected)
    loader.close()
    with pytest.raises(ValueError, match="batch_size"):
        PackedLoader(tokens, seq_len=16, batch_size=2).load_state_dict(state)


def test_rows_are_the_hashers_rows(tmp_path, cache, tok, hasher):
    shard = build_shard(str(make_folder(tmp_path / "corpus")), "train", tok)
    with PackedLoader(shard.tokens, seq_len=32, batch_size=2, hasher=hasher) as loader:
        batch = loader.batches(1)[0]
    direct = hasher(batch.ids)
    assert batch.rows is not None and set(batch.rows) == set(direct) == {0, 2}
    for layer, rows in batch.rows.items():
        assert rows.shape == (2, 32, hasher.spec.heads_total) and rows.dtype == torch.int64
        assert torch.equal(rows, direct[layer])


def test_thread_errors_reach_the_consumer():
    def broken(ids):
        raise RuntimeError("hashing failed on purpose")

    loader = PackedLoader(arange_tokens(), seq_len=8, batch_size=2, hasher=broken)
    with pytest.raises(RuntimeError, match="hashing failed on purpose"):
        next(iter(loader))
    loader.close()
    assert not prefetch_threads()


def test_prefetch_thread_stops_on_close_and_on_garbage_collection():
    loader = PackedLoader(arange_tokens(), seq_len=8, batch_size=2)
    stream = iter(loader)
    next(stream)
    assert prefetch_threads()
    del stream
    gc.collect()
    assert not prefetch_threads()
    with PackedLoader(arange_tokens(), seq_len=8, batch_size=2) as loader:
        next(iter(loader))
    assert not prefetch_threads()
    with pytest.raises(ValueError, match="closed"):
        next(iter(loader))


@pytest.mark.parametrize("world", [2, 3])
def test_ranks_together_see_the_batches_of_one_process(hasher, tok, world):
    """N ranks with batch B yield, rank by rank, the rows of one process's batch of N x B, in the
    same order across epochs, with the same hash rows; a position resumes at any world size."""
    tokens = np.asarray(tok.encode("the quick brown fox jumps over the lazy dog. " * 60))
    kw = {"seq_len": 8, "hasher": hasher, "seed": 5}
    whole = PackedLoader(tokens, batch_size=2 * world, **kw)
    ranks = [PackedLoader(tokens, batch_size=2, rank=r, world=world, **kw) for r in range(world)]
    epoch_len = whole.batches_per_epoch
    assert [r.batches_per_epoch for r in ranks] == [epoch_len] * world
    n = epoch_len + 2  # into the second epoch: its permutation is shared too
    for want, *parts in zip(whole.batches(n), *(r.batches(n) for r in ranks), strict=True):
        assert torch.equal(want.ids, torch.cat([p.ids for p in parts]))
        assert torch.equal(want.targets, torch.cat([p.targets for p in parts]))
        for layer, rows in want.rows.items():
            assert torch.equal(rows, torch.cat([p.rows[layer] for p in parts]))
        assert {(p.epoch, p.index, p.tokens_seen) for p in parts} == {
            (want.epoch, want.index, want.tokens_seen)
        }
    state = whole.state_dict()
    assert all(r.state_dict() == state for r in ranks)
    single = PackedLoader(tokens, batch_size=2 * world, **kw)
    single.load_state_dict(ranks[0].state_dict())
    assert torch.equal(single.batches(1)[0].ids[:2], ranks[0].batches(1)[0].ids)
    with pytest.raises(ValueError, match="rank=3"):
        PackedLoader(tokens, batch_size=2, rank=3, world=3, **kw)


def test_eval_batches_cover_the_tokens_in_order(hasher):
    tokens = arange_tokens(16 * 10 + 5)  # 10 windows, 4 tokens left unscored
    batches = list(eval_batches(tokens, seq_len=16, batch_size=4))
    assert [len(b.ids) for b in batches] == [4, 4, 2]
    targets = torch.cat([b.targets.flatten() for b in batches]).tolist()
    assert targets == list(range(1, 161)) and batches[0].ids[0].tolist() == list(range(16))
    assert batches[-1].tokens_seen == 160
    capped = list(eval_batches(tokens, seq_len=16, batch_size=4, max_tokens=50))
    assert torch.cat([b.targets.flatten() for b in capped]).tolist() == list(range(1, 49))
    small = np.arange(200) % 300
    (batch,) = eval_batches(small, seq_len=16, batch_size=64, hasher=hasher)
    assert all(torch.equal(batch.rows[k], v) for k, v in hasher(batch.ids).items())


def test_loader_rejects_bad_arguments():
    with pytest.raises(ValueError, match="seq_len=0"):
        PackedLoader(arange_tokens(), seq_len=0, batch_size=2)
    with pytest.raises(ValueError, match="prefetch=-1"):
        PackedLoader(arange_tokens(), seq_len=8, batch_size=2, prefetch=-1)
    with pytest.raises(ValueError, match="fewer than one global batch of 1 x batch_size=200"):
        PackedLoader(arange_tokens(), seq_len=8, batch_size=200)
    with pytest.raises(ValueError, match="1-D integer"):
        PackedLoader(np.zeros((4, 100)), seq_len=8, batch_size=2)
    with pytest.raises(ValueError, match="fewer than one window"):
        list(eval_batches(arange_tokens(10), seq_len=16, batch_size=1))
