"""Text sources and (with issue "LM") token shards and loaders."""

from engram.data.sources import read_texts, stdlib_files

__all__ = ["read_texts", "stdlib_files"]
