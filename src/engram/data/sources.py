"""Text sources: where the language model's documents come from, split into train and val.

A *source* is a string:
- "stdlib": the running interpreter's standard library `.py` files (found on every machine);
  "default" is an alias of "stdlib" for now.
- "packages": the `.py` files of the installed distributions `PACKAGES` names (those
  `requirements.lock` pins: torch, transformers, numpy, sympy...; after `make venv` tens of
  millions of tokens), one file = one document: a corpus for studies that need more tokens,
  offline and deterministic for a given set of installed versions (which its fingerprint names).
- a path to a text file: split into blocks of about 64 KB at line boundaries (smaller for small
  files, so that both splits get some), one block = one document;
- a path to a folder: its `*.txt`, `*.md`, `*.py` and `*.rst` files, recursively, one file = one
  document (a folder holding a single text file is split like that file);
- "path.jsonl" or "path.jsonl:field": one JSON object per non-blank line = one document, text
  in `field` ("text" by default);
- "path.parquet" or "path.parquet:field": one row = one document, text in column `field`
  ("text" by default; read with pyarrow, the `data` extra);
- "hf:NAME[:split[:field]]": a Hugging Face dataset (split "train" and field "text" by default)
  that is already on this machine (a `save_to_disk` folder or the `datasets` cache); nothing is
  ever downloaded.

Every split between train and val hashes a key (a path relative to the root, or a block or record
index), so it is the same on every machine and every run. When hashing leaves val empty (a tiny
source), the unit with the smallest hash moves to val, so small sources still get a val split.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import sys
import sysconfig
from collections.abc import Iterable, Iterator
from importlib import metadata
from pathlib import Path
from typing import Any

VAL_FRACTION = 0.05
SPLITS = ("train", "val")
TEXT_SUFFIXES = (".txt", ".md", ".py", ".rst")
RECORD_SUFFIXES = (".jsonl", ".parquet")  # one record = one document
# Bump when the splitting or blocking rules change: shards cached under old rules no longer match.
SPLIT_VERSION = 1
_ALIASES = {"default": "stdlib"}
_MAX_BLOCK = 64 * 1024  # characters per block of a single text file
_MIN_BLOCK = 512
_TARGET_BLOCKS = 32  # small files get smaller blocks so that both splits are populated


# The distributions of the "packages" corpus: the Python ones requirements.lock pins.
PACKAGES = (
    "torch", "transformers", "numpy", "sympy", "mpmath", "matplotlib", "hypothesis",
    "huggingface_hub", "accelerate", "pyarrow", "tqdm", "safetensors", "tokenizers",
    "packaging", "filelock", "sortedcontainers", "psutil", "PyYAML", "regex",
)  # fmt: skip


def package_files(split: str | None = None, val_fraction: float = VAL_FRACTION) -> list[Path]:
    """The `.py` files of the installed `PACKAGES` (sorted by distribution, then path), the
    files of `split` only if given (a hash of "distribution/relative path" decides)."""
    _check_split(split, allow_none=True)
    files = []
    for name in PACKAGES:
        try:
            dist = metadata.distribution(name)
        except metadata.PackageNotFoundError:
            continue
        for rel in sorted(str(f) for f in dist.files or () if str(f).endswith(".py")):
            key = f"{name}/{rel}"
            if split is None or _split_of(key, val_fraction) == split:
                files.append(Path(dist.locate_file(rel)))
    return [f for f in files if f.is_file()]


def _package_versions() -> str:
    found = []
    for name in PACKAGES:
        try:
            found.append(f"{name}=={metadata.version(name)}")
        except metadata.PackageNotFoundError:
            continue
    return ",".join(found)


def stdlib_root() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def _bucket(key: str) -> float:
    return int(hashlib.sha256(key.encode()).hexdigest()[:8], 16) / 0xFFFFFFFF


def _split_of(relative: str, val_fraction: float) -> str:
    return "val" if _bucket(relative) < val_fraction else "train"


def _check_split(split: str | None, allow_none: bool = False) -> None:
    if split in SPLITS or (allow_none and split is None):
        return
    allowed = "'train', 'val' or None" if allow_none else "'train' or 'val'"
    raise ValueError(f"split={split!r} must be {allowed}")


def _stdlib_sources(root: Path) -> list[Path]:
    """Every `.py` under `root` but site-packages and tests, sorted like `sorted(rglob)`."""
    found = []
    for folder, subdirs, names in os.walk(root):
        rel = Path(folder).relative_to(root).as_posix()
        # Pruned during the walk: site-packages alone can hold ten times the stdlib's files.
        subdirs[:] = [
            d
            for d in subdirs
            if not (rel == "." and d in ("site-packages", "test"))
            and not (rel == "idlelib" and d == "idle_test")
            and not (rel != "." and d == "tests")
        ]
        found.extend(Path(folder) / n for n in names if n.endswith(".py"))
    return sorted(found)


def stdlib_files(
    split: str | None = None, val_fraction: float = VAL_FRACTION, max_files: int | None = None
) -> list[Path]:
    """Sorted `.py` files of the running interpreter's stdlib (tests and site-packages excluded)."""
    _check_split(split, allow_none=True)
    root = stdlib_root()
    files = []
    for path in _stdlib_sources(root):
        if split is None or _split_of(path.relative_to(root).as_posix(), val_fraction) == split:
            files.append(path)
        if max_files is not None and len(files) >= max_files:
            break
    return files


def read_texts(paths: list[Path]) -> Iterator[str]:
    """File contents, skipping files that are not valid UTF-8."""
    for path in paths:
        try:
            yield path.read_text(encoding="utf-8")
        except (UnicodeDecodeError, OSError):
            continue


# ---- parsing a source string ------------------------------------------------------------------
def _record_parts(source: str) -> tuple[Path, str] | None:
    """(path, field) when `source` names a JSONL or Parquet file of records, else None."""
    if source.endswith(RECORD_SUFFIXES):
        return Path(source), "text"
    head, sep, field = source.rpartition(":")
    if sep and head.endswith(RECORD_SUFFIXES) and field:
        return Path(head), field
    return None


def _hf_parts(source: str) -> tuple[str, str, str]:
    """(name, split, field) of "hf:NAME[:split[:field]]", by default split "train", field "text"."""
    parts = source[len("hf:") :].split(":")
    if len(parts) > 3 or any(not p for p in parts):
        raise ValueError(f"data source {source!r} must look like 'hf:NAME[:split[:field]]'")
    name, hf_split, field = parts + ["train", "text"][len(parts) - 1 :]
    return name, hf_split, field


def canonical_source(source: str) -> str:
    """The stable name of a source: aliases resolved, paths made absolute (for cache keys)."""
    if not isinstance(source, str) or not source:
        raise ValueError(f"data source {source!r} must be a non-empty string")
    source = _ALIASES.get(source, source)
    if source in ("stdlib", "packages"):
        return source
    if source.startswith("hf:"):
        name, hf_split, field = _hf_parts(source)
        if Path(name).is_dir():  # a save_to_disk folder: name it absolutely, like other paths
            return f"hf:{Path(name).resolve()}:{hf_split}:{field}"
        return source
    records = _record_parts(source)
    if records is not None:
        path, field = records
        if not path.is_file():
            raise ValueError(f"data source {source!r}: file {str(path)!r} does not exist")
        return f"{path.resolve()}:{field}"
    path = Path(source)
    if not path.exists():
        raise ValueError(
            f"unknown data source {source!r}: not 'default', 'stdlib', 'packages' or 'hf:NAME', "
            "and no such file or folder (expected a text file, a folder of text files, "
            "path.jsonl[:field] or path.parquet[:field])"
        )
    return str(path.resolve())


# ---- splitting --------------------------------------------------------------------------------
def _forced_val(keys: Iterable[str], val_fraction: float = VAL_FRACTION) -> str | None:
    """The key moved to val when hashing puts none of `keys` there (and there are >= 2 keys).

    Stops at the first key that hashes into val, so a lazy iterable is read only that far.
    """
    best: tuple[float, str] | None = None
    count = 0
    for key in keys:
        count += 1
        bucket = _bucket(key)
        if bucket < val_fraction:
            return None
        if best is None or bucket < best[0]:
            best = (bucket, key)
    return best[1] if best is not None and count >= 2 else None


def _in_split(key: str, split: str, forced: str | None) -> bool:
    """Whether the unit named `key` belongs to `split`, given `_forced_val`'s answer."""
    is_val = key == forced or (forced is None and _split_of(key, VAL_FRACTION) == "val")
    return is_val == (split == "val")


def _text_files(folder: Path) -> list[Path]:
    return sorted(p for p in folder.rglob("*") if p.is_file() and p.suffix.lower() in TEXT_SUFFIXES)


def _folder_documents(folder: Path, files: list[Path], split: str) -> Iterator[str]:
    keys = [p.relative_to(folder).as_posix() for p in files]
    forced = _forced_val(keys)
    chosen = [p for p, key in zip(files, keys, strict=True) if _in_split(key, split, forced)]
    yield from read_texts(chosen)


def _blocks(path: Path) -> Iterator[str]:
    """The file as blocks of whole lines of about `block` characters (the last may be shorter)."""
    block = min(_MAX_BLOCK, max(_MIN_BLOCK, path.stat().st_size // _TARGET_BLOCKS))
    lines: list[str] = []
    size = 0
    with path.open(encoding="utf-8", newline="") as f:
        for line in f:
            lines.append(line)
            size += len(line)
            if size >= block:
                yield "".join(lines)
                lines, size = [], 0
    if lines:
        yield "".join(lines)


def _file_documents(path: Path, split: str) -> Iterator[str]:
    try:
        forced = _forced_val(str(i) for i, _ in enumerate(_blocks(path)))
        for i, block in enumerate(_blocks(path)):
            if _in_split(str(i), split, forced):
                yield block
    except UnicodeDecodeError as e:
        raise ValueError(f"data source {str(path)!r} is not UTF-8 text: {e}") from e


def _jsonl_records(path: Path) -> Iterator[tuple[int, str]]:
    """(line number, line) of every non-blank line."""
    with path.open(encoding="utf-8") as f:
        for lineno, line in enumerate(f, start=1):
            if line.strip():
                yield lineno, line


def _record_text(record: Any, field: str, where: str) -> str:
    if not isinstance(record, dict) or not isinstance(record.get(field), str):
        raise ValueError(f"{where}: record has no string field {field!r}")
    return record[field]


def _jsonl_documents(path: Path, field: str, split: str) -> Iterator[str]:
    forced = _forced_val(str(i) for i, _ in enumerate(_jsonl_records(path)))
    for i, (lineno, line) in enumerate(_jsonl_records(path)):
        if not _in_split(str(i), split, forced):
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as e:
            raise ValueError(f"{path}:{lineno}: not valid JSON ({e})") from e
        yield _record_text(record, field, f"{path}:{lineno}")


def _parquet_documents(path: Path, field: str, split: str) -> Iterator[str]:
    """Row i of a Parquet file's `field` column is document i (pyarrow, read a batch at a time)."""
    try:
        import pyarrow
        import pyarrow.parquet as pq
    except ImportError as e:
        raise ValueError(f"data source {str(path)!r}: reading Parquet needs pyarrow") from e
    try:
        table = pq.ParquetFile(path)
        rows = table.metadata.num_rows
        if field not in table.schema_arrow.names:
            raise ValueError(f"{path}: no column {field!r} (it has {table.schema_arrow.names})")
        forced = _forced_val(str(i) for i in range(rows))
        i = 0
        for batch in table.iter_batches(columns=[field], batch_size=4096):
            for text in batch.column(0).to_pylist():
                if _in_split(str(i), split, forced):
                    yield _record_text({field: text}, field, f"{path}: row {i}")
                i += 1
    except (OSError, pyarrow.ArrowException) as e:  # not Parquet, truncated
        raise ValueError(f"data source {str(path)!r} is not a readable Parquet file: {e}") from e


# ---- Hugging Face datasets, local only ---------------------------------------------------------
@contextlib.contextmanager
def _hf_offline(datasets: Any) -> Iterator[None]:
    """Switch `datasets` and `huggingface_hub` to offline mode for the duration of a load.

    Their env vars (HF_HUB_OFFLINE, HF_DATASETS_OFFLINE) are read once at import, possibly before
    this module ran, so the flags are set on the modules themselves (read at each request) and
    restored afterwards; the rest of the process keeps its own setting.
    """
    targets: list[tuple[Any, str]] = [(datasets.config, "HF_HUB_OFFLINE")]
    targets.append((datasets.config, "HF_DATASETS_OFFLINE"))  # the name before datasets 3
    try:
        from huggingface_hub import constants as hub_constants

        targets.append((hub_constants, "HF_HUB_OFFLINE"))
    except ImportError:  # pragma: no cover - a dependency of datasets
        pass
    saved = [(obj, attr, getattr(obj, attr)) for obj, attr in targets if hasattr(obj, attr)]
    for obj, attr, _ in saved:
        setattr(obj, attr, True)
    try:
        yield
    finally:
        for obj, attr, value in saved:
            setattr(obj, attr, value)


def _load_hf(source: str) -> tuple[Any, str]:
    """The local `datasets.Dataset` of an "hf:" source and its text field; never downloads."""
    name, hf_split, field = _hf_parts(source)
    try:
        import datasets
    except ImportError as e:
        raise ValueError(
            f"data source {source!r} needs the Hugging Face `datasets` package "
            "(pip install datasets) and the dataset on this machine; or export it to a .jsonl "
            "file and pass that path instead"
        ) from e
    try:
        with _hf_offline(datasets):
            if Path(name).is_dir():
                loaded = datasets.load_from_disk(name)
                ds = loaded[hf_split] if isinstance(loaded, datasets.DatasetDict) else loaded
            else:
                config = datasets.DownloadConfig(local_files_only=True)
                ds = datasets.load_dataset(name, split=hf_split, download_config=config)
    except Exception as e:  # whatever `datasets` raises for "not here": one clear message
        raise ValueError(
            f"data source {source!r}: dataset {name!r} (split {hf_split!r}) is not available "
            f"locally and nothing is downloaded ({type(e).__name__}: {e}). Download it once "
            "with `datasets` and save_to_disk(), then pass hf:FOLDER, or use a .jsonl file"
        ) from e
    if field not in ds.column_names:
        raise ValueError(
            f"data source {source!r}: field {field!r} not in columns {ds.column_names}"
        )
    return ds, field


def _hf_documents(ds: Any, field: str, split: str) -> Iterator[str]:
    forced = _forced_val(str(i) for i in range(len(ds)))
    i = 0
    # Column batches: row-by-row access builds one dict per record, far slower.
    for chunk in ds.select_columns([field]).iter(batch_size=1024):
        for text in chunk[field]:
            if _in_split(str(i), split, forced):
                yield _record_text({field: text}, field, f"record {i}")
            i += 1


# ---- public API -------------------------------------------------------------------------------
def documents(source: str, split: str) -> Iterator[str]:
    """The documents of `source` in split 'train' or 'val', in a fixed order (empty ones skipped).

    `source` is "stdlib" ("default" is an alias of it for now), a text file, a folder of text files,
    "path.jsonl[:field]", "path.parquet[:field]" or "hf:NAME[:split[:field]]" (see the module
    docstring). The source is
    checked here, before the first document is read, so a bad source fails at the call.
    """
    _check_split(split)
    name = canonical_source(source)
    if name == "stdlib":
        docs: Iterator[str] = read_texts(stdlib_files(split))
    elif name == "packages":
        docs = read_texts(package_files(split))
    elif name.startswith("hf:"):
        docs = _hf_documents(*_load_hf(name), split)
    elif (records := _record_parts(name)) is not None:
        read = _parquet_documents if records[0].suffix == ".parquet" else _jsonl_documents
        docs = read(records[0], records[1], split)
    elif Path(name).is_dir():
        files = _text_files(Path(name))
        if not files:
            raise ValueError(f"data source {source!r}: no {'/'.join(TEXT_SUFFIXES)} files")
        if len(files) == 1:
            docs = _file_documents(files[0], split)
        else:
            docs = _folder_documents(Path(name), files, split)
    else:
        docs = _file_documents(Path(name), split)
    return (doc for doc in docs if doc)


def _stat_lines(paths: list[Path], root: Path) -> Iterator[str]:
    for path in paths:
        st = path.stat()
        yield f"{path.relative_to(root).as_posix()}\t{st.st_size}\t{st.st_mtime_ns}\n"


def _hf_fingerprint_lines(source: str) -> Iterator[str]:
    ds, _ = _load_hf(source)
    yield f"fingerprint\t{getattr(ds, '_fingerprint', '')}\trows\t{len(ds)}\n"
    files = sorted(Path(f["filename"]) for f in ds.cache_files)
    yield from _stat_lines(files, Path("/"))


def source_fingerprint(source: str) -> str:
    """sha256 of what the source's documents depend on: its files' names, sizes and mtimes.

    For "stdlib" the Python version counts too; for "hf:" the dataset's own fingerprint and its
    Arrow cache files. `SPLIT_VERSION` is mixed in, since the split rules shape the documents.
    """
    name = canonical_source(source)
    lines: Iterable[str]
    if name == "stdlib":
        head = f"stdlib\t{sys.version}\n"
        lines = _stat_lines(stdlib_files(), stdlib_root())
    elif name == "packages":  # the versions, and every file's size and mtime
        head = f"packages\t{_package_versions()}\n"
        lines = _stat_lines(package_files(), Path("/"))
    elif name.startswith("hf:"):
        head = f"{name}\n"
        lines = _hf_fingerprint_lines(name)
    else:
        records = _record_parts(name)
        path = records[0] if records else Path(name)
        head = f"{name}\n"
        if path.is_dir():
            lines = _stat_lines(_text_files(path), path)
        else:
            lines = _stat_lines([path], path.parent)
    h = hashlib.sha256(f"split-version\t{SPLIT_VERSION}\n{head}".encode())
    for line in lines:
        h.update(line.encode())
    return h.hexdigest()
