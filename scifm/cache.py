"""Featurization cache: samples featurized once per (dataset content, featurizer settings).

A cache entry is two files named by a content hash (the key):

- ``<key>.safetensors``: for each modality and tensor field, all items' values flattened and
  concatenated into one 1-D tensor;
- ``<key>.json``: the samples (id, prompt, answer, target), for each item its type, shapes
  and offsets into those tensors, and the skip report of the records that failed.

Reading is memory-mapped: :class:`CachedSamples` slices only the items a batch needs out of
the safetensors file (``safe_open(...).get_slice``), opening the file lazily in each DataLoader
worker. Nothing is pickled. Any change of the data file's bytes, a featurizer setting, the
template or the data module's reading options gives another key, so a stale entry is never read.
"""

from __future__ import annotations

import hashlib
import json
import os
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass, fields, is_dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file
from torch import Tensor
from torch.utils.data import Dataset

from scifm.tokenization import Sample

CACHE_FORMAT = 1


def default_cache_dir() -> Path:
    """``$SCIFM_CACHE``, else ``$XDG_CACHE_HOME/scifm/features``, else ``~/.cache/scifm/features``."""
    if os.environ.get("SCIFM_CACHE"):
        return Path(os.environ["SCIFM_CACHE"]).expanduser()
    base = Path(os.environ.get("XDG_CACHE_HOME", Path.home() / ".cache"))
    return base / "scifm" / "features"


def file_digest(path: str | os.PathLike[str], *, chunk: int = 1 << 20) -> str:
    """sha256 of a file's bytes (streamed), or of a directory's files and their names."""
    p = Path(path)
    h = hashlib.sha256()
    files = sorted(q for q in p.rglob("*") if q.is_file()) if p.is_dir() else [p]
    for f in files:
        h.update(str(f.relative_to(p) if p.is_dir() else f.name).encode())
        with f.open("rb") as fh:
            while block := fh.read(chunk):
                h.update(block)
    return h.hexdigest()


def cache_key(parts: dict[str, Any]) -> str:
    """A stable hash of JSON-able settings (keys sorted)."""
    text = json.dumps(parts, sort_keys=True, default=str)
    return hashlib.sha256(text.encode()).hexdigest()[:32]


# -- item codecs -------------------------------------------------------------------------------
def _encode_item(item: Any) -> tuple[str, dict[str, Tensor], dict[str, Any]] | None:
    """``(type, tensors, plain metadata)`` of a featurized item, or None when not cacheable."""
    from scifm._extras import require

    try:
        data_cls = require("torch_geometric.data", extra="molecule").Data
    except ImportError:
        data_cls = None
    if data_cls is not None and isinstance(item, data_cls):
        tensors: dict[str, Tensor] = {}
        graph_meta: dict[str, Any] = {"num_nodes": int(item.num_nodes)}
        for key, value in item.to_dict().items():
            if isinstance(value, Tensor):
                tensors[key] = value
            elif key != "num_nodes":
                return None  # a non-tensor attribute we would lose
        return "pyg", tensors, graph_meta
    if is_dataclass(item) and not isinstance(item, type):
        tensors = {}
        meta: dict[str, Any] = {}
        for f in fields(item):
            value = getattr(item, f.name)
            if isinstance(value, Tensor):
                tensors[f.name] = value
            elif value is None or isinstance(value, (int, float, str, bool)):
                meta[f.name] = value
            else:
                return None
        return f"dataclass:{type(item).__module__}:{type(item).__qualname__}", tensors, meta
    return None


def _decode_item(kind: str, tensors: dict[str, Tensor], meta: dict[str, Any]) -> Any:
    if kind == "pyg":
        from torch_geometric.data import Data

        return Data(**tensors, num_nodes=meta["num_nodes"])
    _, module, qualname = kind.split(":", 2)
    import importlib

    cls: Any = importlib.import_module(module)
    for part in qualname.split("."):
        cls = getattr(cls, part)
    return cls(**tensors, **meta)


# -- writing -----------------------------------------------------------------------------------
def write_cache(directory: Path, key: str, samples: Sequence[Sample], *, report: dict[str, Any]) -> bool:
    """Write ``samples`` under ``key``; returns False (writing nothing) if an item type is not
    cacheable. Written atomically: temporary files, then renames, the JSON last."""
    flat: dict[str, list[Tensor]] = {}
    offsets: dict[str, int] = {}
    rows = []
    for sample in samples:
        items: dict[str, list[dict[str, Any]]] = {}
        for modality, values in sample.items.items():
            entries = []
            for item in values:
                encoded = _encode_item(item)
                if encoded is None:
                    return False
                kind, tensors, meta = encoded
                spans = {}
                for name, tensor in tensors.items():
                    field_key = f"{modality}/{kind}/{name}/{tensor.dtype}".replace(".", "_")
                    start = offsets.get(field_key, 0)
                    flat.setdefault(field_key, []).append(tensor.detach().reshape(-1).cpu())
                    offsets[field_key] = start + tensor.numel()
                    spans[name] = [field_key, start, list(tensor.shape)]
                entries.append({"kind": kind, "meta": meta, "tensors": spans})
            items[modality] = entries
        rows.append(
            {
                "id": sample.id,
                "prompt": sample.prompt,
                "answer": sample.answer,
                "target": sample.target,
                "items": items,
            }
        )
    directory.mkdir(parents=True, exist_ok=True)
    tensors = {k: torch.cat(v) if v else torch.empty(0) for k, v in flat.items()}
    if not tensors:
        tensors = {"_empty": torch.empty(0)}
    fd, tmp_st = tempfile.mkstemp(dir=directory, suffix=".safetensors.tmp")
    os.close(fd)
    save_file(tensors, tmp_st)
    os.replace(tmp_st, directory / f"{key}.safetensors")
    meta = {"format": CACHE_FORMAT, "samples": rows, "report": report}
    fd, tmp_js = tempfile.mkstemp(dir=directory, suffix=".json.tmp")
    with os.fdopen(fd, "w") as fh:
        json.dump(meta, fh)
    os.replace(tmp_js, directory / f"{key}.json")
    return True


@dataclass
class CacheEntry:
    tensors: Path
    samples: list[dict[str, Any]]
    report: dict[str, Any]


def read_cache(directory: Path, key: str) -> CacheEntry | None:
    """The entry for ``key``, or None when absent or written by another cache format."""
    meta_path, tensor_path = directory / f"{key}.json", directory / f"{key}.safetensors"
    if not (meta_path.is_file() and tensor_path.is_file()):
        return None
    meta = json.loads(meta_path.read_text())
    if meta.get("format") != CACHE_FORMAT:
        return None
    return CacheEntry(tensor_path, meta["samples"], meta["report"])


class CachedSamples(Dataset[Sample]):
    """Samples read from a cache entry; items are sliced out of the memory-mapped tensors on access.

    Picklable (DataLoader workers): the file handle is opened lazily in each process.
    """

    def __init__(self, entry: CacheEntry) -> None:
        self.path = entry.tensors
        self.rows = entry.samples
        self._handle: Any = None

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_handle"] = None
        return state

    def __len__(self) -> int:
        return len(self.rows)

    def text_lengths(self) -> list[int]:
        """Characters of prompt + answer per sample (read from the index, no tensor is loaded)."""
        return [len(r["prompt"]) + len(r["answer"] or "") for r in self.rows]

    @property
    def samples(self) -> list[Sample]:
        """All samples, materialized (small data sets and tests)."""
        return [self[i] for i in range(len(self))]

    def __getitem__(self, index: int) -> Sample:
        if self._handle is None:
            self._handle = safe_open(str(self.path), framework="pt")
        row = self.rows[index]
        items = {}
        for modality, entries in row["items"].items():
            decoded = []
            for entry in entries:
                tensors = {
                    name: self._handle.get_slice(key)[start : start + _numel(shape)].reshape(shape)
                    for name, (key, start, shape) in entry["tensors"].items()
                }
                decoded.append(_decode_item(entry["kind"], tensors, entry["meta"]))
            items[modality] = decoded
        return Sample(
            id=row["id"], prompt=row["prompt"], answer=row["answer"], items=items, target=row["target"]
        )


def _numel(shape: list[int]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n
