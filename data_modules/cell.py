"""Single-cell data: ``.h5ad`` files (or bundled scanpy datasets) -> cell samples.

:class:`CellDataModule` reads an AnnData whose ``obs`` columns fill a template (cell type as
text, as a class label, a description). Small and medium files are read into memory; with
``streaming: true`` the file stays on disk and is read in shuffled contiguous blocks inside
each DataLoader worker, so memory stays flat whatever the file's size.

:class:`DrugResponseDataModule` reads perturbation screens in the sci-Plex / chemCPA layout
(one cell per row; ``obs`` holds the drug SMILES, dose, time, a control flag and the cell
line) and builds samples ``(<cell> control state, <mol> drug, dose, time) -> expression
change``: a regression target over all model genes plus the top up/down genes as text.
:func:`drug_response_r2` scores predictions against the "no change" and "mean drug effect"
baselines.

Which matrix is read (``X``, a layer, ``raw``) and how it is processed is the model's cell
featurizer's setting (``encoders[cell].featurizer``), so training and ``predict`` agree.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np
import torch
from lightning.pytorch.utilities import rank_zero_info, rank_zero_warn
from torch.utils.data import DataLoader, IterableDataset

from scifm._extras import require
from scifm.data_modules.base import OnError, Record, ScifmDataModule, SkipReport
from scifm.data_modules.splits import random_split
from scifm.encoders.cell import CellFeaturizer, CellRow, check_expression, read_anndata
from scifm.errors import InvalidInputError
from scifm.templates import Template
from scifm.tokenization import PromptProcessor, Sample

if TYPE_CHECKING:
    from anndata import AnnData

__all__ = ["CellDataModule", "CellStream", "DrugResponseDataModule", "drug_response_r2"]

_EXTRA = "cell"


def _source_name(path: str) -> str:
    return path if path.startswith("scanpy:") else Path(path).name


def _check_obs(obs_columns: Sequence[str], wanted: Sequence[str], *, source: str) -> None:
    missing = [c for c in dict.fromkeys(wanted) if c not in obs_columns]
    if missing:
        raise InvalidInputError(
            source,
            f"obs has no column(s) {missing} (read by the template or settings); "
            f"obs columns: {list(obs_columns)}",
        )


def _row_ids(obs_names: Sequence[str], *, source: str) -> list[str]:
    names = [str(n) for n in obs_names]
    if len(set(names)) == len(names):
        return [f"{source}:{n}" for n in names]
    return [f"{source}:{i}" for i in range(len(names))]  # obs names repeat: use positions


def make_sample(
    template: Template,
    classes: Sequence[str],
    *,
    rid: str,
    row: dict[str, Any],
    items: dict[str, list[Any]],
    need_answer: bool,
) -> Sample:
    """A :class:`Sample` from a record's columns and featurized items (as the base module does)."""
    if not need_answer:
        prompt, _ = Template(prompt=template.prompt).render(row, record=rid)
        return Sample(id=rid, prompt=prompt, items=items)
    prompt, answer = template.render(row, record=rid)
    target: list[float] | int | None = template.target(row, record=rid)
    if template.label is not None:
        label = str(row[template.label])
        if label not in classes:
            raise InvalidInputError(rid, f"label {label!r} is not one of the classes {list(classes)}")
        target = list(classes).index(label)
    return Sample(id=rid, prompt=prompt, answer=answer, items=items, target=target)


# ---------------------------------------------------------------------------- streaming


class CellStream(IterableDataset[Sample]):
    """Samples streamed from an ``.h5ad`` on disk, read in contiguous row blocks.

    Random single-row reads of an h5ad run at ~240 cells/s, blocks of 1,024 rows at ~100k
    cells/s, so each epoch shuffles the order of the blocks and, inside a buffer of
    ``buffer_blocks`` blocks, the order of the rows. At most ``buffer_blocks * block_size`` rows
    are in memory per worker. The file is opened (read-only, h5py + anndata's sparse dataset)
    lazily in each worker: an open file does not pickle.

    Sharding: blocks go round-robin to the ``world_size * num_workers`` readers (DDP rank from
    ``torch.distributed``, worker from ``get_worker_info``), each block to exactly one. Under DDP
    every rank gets the same number of full blocks (the ragged tail is dropped) so that ranks
    step in lockstep; ``on_error: skip`` can still unbalance them, use ``raise`` with DDP.

    Each pass over the data (epoch) reshuffles with ``seed`` and the pass number; with
    ``num_workers > 0`` keep ``persistent_workers`` (the data module does) so workers count passes.

    Args:
        path: the ``.h5ad`` file.
        blocks: ``(start, stop)`` row ranges this split reads.
        featurizer: the model's :class:`~scifm.encoders.cell.CellFeaturizer`.
        template: fills prompts and answers from ``obs`` columns.
        classes: class order for the template's ``label``.
        processor: checks each sample's placeholders and length before it is yielded.
        columns: ``obs`` columns to load (template fields, ``id_column``).
        id_column: ``obs`` column naming records (default: ``"<file>:<obs name>"``).
        shuffle: shuffle blocks and rows (training) (default: False).
        buffer_blocks: blocks whose rows are shuffled together (default: 4).
        seed: base seed of the shuffles (default: 0).
        on_error: "raise" or "skip" a bad cell (skips are counted and reported per pass).
        need_answer: fill the template's answer and targets (default: True).
    """

    def __init__(
        self,
        path: str,
        *,
        blocks: Sequence[tuple[int, int]],
        featurizer: CellFeaturizer,
        template: Template,
        classes: Sequence[str],
        processor: PromptProcessor,
        columns: Sequence[str],
        id_column: str | None = None,
        shuffle: bool = False,
        buffer_blocks: int = 4,
        seed: int = 0,
        on_error: OnError = "raise",
        need_answer: bool = True,
    ) -> None:
        super().__init__()
        if buffer_blocks < 1:
            raise ValueError(f"buffer_blocks must be >= 1, got {buffer_blocks}")
        self.path, self.blocks = path, [(int(a), int(b)) for a, b in blocks]
        self.featurizer, self.template, self.classes = featurizer, template, list(classes)
        self.processor, self.columns, self.id_column = processor, list(columns), id_column
        self.shuffle, self.buffer_blocks, self.seed = shuffle, buffer_blocks, seed
        self.on_error: OnError = on_error
        self.need_answer = need_answer
        self.passes = 0
        self._file: Any = None
        self._obs: dict[str, np.ndarray] | None = None

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_file"], state["_obs"] = None, None
        return state

    @property
    def num_rows(self) -> int:
        return sum(b - a for a, b in self.blocks)

    # -- file access ------------------------------------------------------------------------------
    def _open(self) -> Any:
        if self._file is None:
            h5py = require("h5py", extra=_EXTRA)
            self._file = h5py.File(self.path, "r")
            self._obs = read_obs_columns(
                self._file, [*self.columns, *([self.id_column] if self.id_column else [])]
            )
            self._genes = tuple(_h5_genes(self._file, self.featurizer))
            self._element = _h5_matrix(self._file, self.featurizer, source=self.path)
        return self._file

    def _read_rows(self, start: int, stop: int) -> Any:
        """Rows ``[start, stop)`` of the configured matrix: one contiguous read."""
        self._open()
        return self._element[start:stop]

    # -- iteration --------------------------------------------------------------------------------
    def shard(
        self, *, worker: int, num_workers: int, rank: int, world_size: int, epoch: int
    ) -> list[tuple[int, int]]:
        """The blocks one reader gets in pass ``epoch`` (shuffled order when ``shuffle``)."""
        blocks = list(self.blocks)
        if world_size > 1:
            full = [b for b in blocks if b[1] - b[0] == max(s - a for a, s in blocks)]
            blocks = full[: len(full) // world_size * world_size]
        if self.shuffle:
            order = np.random.default_rng([self.seed, epoch]).permutation(len(blocks))
            blocks = [blocks[i] for i in order]
        return blocks[rank::world_size][worker::num_workers]

    def __iter__(self) -> Iterator[Sample]:
        info = torch.utils.data.get_worker_info()
        worker, num_workers = (info.id, info.num_workers) if info is not None else (0, 1)
        rank, world = 0, 1
        if torch.distributed.is_available() and torch.distributed.is_initialized():
            rank, world = torch.distributed.get_rank(), torch.distributed.get_world_size()
        epoch = self.passes
        self.passes += 1
        mine = self.shard(worker=worker, num_workers=num_workers, rank=rank, world_size=world, epoch=epoch)
        rng = np.random.default_rng([self.seed, epoch, rank, worker, 1])
        self._open()
        source = _source_name(self.path)
        report = SkipReport()
        for start in range(0, len(mine), self.buffer_blocks):
            rows: list[tuple[int, CellRow]] = []
            for a, b in mine[start : start + self.buffer_blocks]:
                rows += self._block_rows(a, b, source=source)
            order = rng.permutation(len(rows)) if self.shuffle else range(len(rows))
            for i in order:
                index, cell = rows[i]
                report.total += 1
                try:
                    sample = self._sample(index, cell, source=source)
                    self.processor.encode(sample)
                except InvalidInputError as err:
                    if self.on_error == "raise":
                        raise
                    report.add(err)
                    continue
                yield sample
        if report.skipped:
            rank_zero_warn(report.summary(f"{source} (stream, rank {rank} worker {worker})"))

    def _block_rows(self, start: int, stop: int, *, source: str) -> list[tuple[int, CellRow]]:
        sparse = require("scipy.sparse", extra=_EXTRA)
        matrix = self._read_rows(start, stop)
        matrix = sparse.csr_matrix(matrix) if sparse.issparse(matrix) else np.asarray(matrix)
        checked = self.on_error == "raise"
        if checked:  # one vectorized check per block; under "skip" each cell is checked alone
            check_expression(
                matrix,
                data=self.featurizer.data,
                source=f"{source} rows {start}-{stop}",
                genes=self._genes,
                row_names=[str(i) for i in range(start, stop)],
            )
        return [(start + i, CellRow(matrix[i], self._genes, checked=checked)) for i in range(stop - start)]

    def _sample(self, index: int, cell: CellRow, *, source: str) -> Sample:
        assert self._obs is not None
        row = {c: _plain(self._obs[c][index]) for c in self._obs}
        rid = f"{source}:{row[self.id_column]}" if self.id_column else f"{source}:{index}"
        item = self.featurizer(cell, record=rid)
        return make_sample(
            self.template,
            self.classes,
            rid=rid,
            row=row,
            items={"cell": [item]},
            need_answer=self.need_answer,
        )


def _plain(value: Any) -> Any:
    return value.item() if isinstance(value, np.generic) else value


def read_obs_columns(h5: Any, columns: Sequence[str]) -> dict[str, np.ndarray]:
    """Selected ``obs`` columns of an open h5ad (categoricals as objects; ``"_index"`` = obs names)."""
    io = _anndata_io()
    group = h5["obs"]
    out: dict[str, np.ndarray] = {}
    index_key = group.attrs.get("_index", "_index")
    for col in dict.fromkeys(columns):
        key = index_key if col == "_index" else col
        if key not in group:
            raise InvalidInputError(
                str(h5.filename),
                f"obs has no column {col!r}; obs columns: {list(group.attrs.get('column-order', []))}",
            )
        values = io.read_elem(group[key])
        out[col] = np.asarray(values, dtype=object) if hasattr(values, "categories") else np.asarray(values)
    return out


def _anndata_io() -> Any:
    ad = require("anndata", extra=_EXTRA)
    return ad.io if hasattr(ad, "io") and hasattr(ad.io, "sparse_dataset") else ad.experimental


def _h5_element_path(featurizer: CellFeaturizer) -> str:
    if featurizer.use_raw:
        return "raw/X"
    return f"layers/{featurizer.layer}" if featurizer.layer else "X"


def _h5_matrix(h5: Any, featurizer: CellFeaturizer, *, source: str) -> Any:
    """The configured matrix of an open h5ad as something sliceable by row blocks."""
    key = _h5_element_path(featurizer)
    if key not in h5:
        raise InvalidInputError(
            source,
            f"the file has no {key!r} (featurizer layer={featurizer.layer!r}, use_raw={featurizer.use_raw})",
        )
    element = h5[key]
    encoding = element.attrs.get("encoding-type", "array")
    if encoding == "csc_matrix":
        raise InvalidInputError(
            source,
            f"{key} is stored column-major (CSC): streaming reads rows, which would "
            "read the whole matrix; rewrite it as CSR (adata.X = adata.X.tocsr())",
        )
    return _anndata_io().sparse_dataset(element) if encoding == "csr_matrix" else element


def _h5_genes(h5: Any, featurizer: CellFeaturizer) -> list[str]:
    var_key = "raw/var" if featurizer.use_raw else "var"
    var = _anndata_io().read_elem(h5[var_key])
    if featurizer.gene_column is None:
        return [str(g) for g in var.index]
    if featurizer.gene_column not in var.columns:
        raise InvalidInputError(
            str(h5.filename), f"var has no column {featurizer.gene_column!r} (gene_column)"
        )
    return [str(g) for g in var[featurizer.gene_column]]


# ---------------------------------------------------------------------------- data modules


class CellDataModule(ScifmDataModule):
    """Reads ``.h5ad`` files of cells; ``obs`` columns fill the template.

    Args:
        path: an ``.h5ad`` file, or ``"scanpy:pbmc68k_reduced"`` / ``"scanpy:krumsiek11"``
            (bundled with scanpy, offline).
        template: template name, YAML path or mapping; its single ``<cell>`` is the row's cell,
            its fields are ``obs`` columns (e.g. ``label: bulk_labels`` for a classification
            head). A missing column raises :class:`~scifm.InvalidInputError` naming the file.
        id_column: ``obs`` column naming records (default: ``"<file>:<obs name>"``, or the row
            position when obs names repeat).
        group_column: ``obs`` column for ``split: group`` (a donor, a batch): no group is shared
            between train, val and test (default: None).
        streaming: leave the file on disk and stream shuffled blocks (see :class:`CellStream`);
            for files bigger than memory. Splits are then made of whole blocks (default: False).
        block_size: rows per contiguous read when streaming (default: 1024).
        buffer_blocks: blocks whose rows are shuffled together when streaming (default: 4).

    The rest are :class:`~scifm.data_modules.base.ScifmDataModule`'s. Which matrix is read and
    how it is normalized comes from the model's cell featurizer (``data``, ``layer``, ``use_raw``).
    """

    classes: list[str]

    def __init__(
        self,
        path: str,
        *,
        template: str | dict[str, Any],
        id_column: str | None = None,
        group_column: str | None = None,
        streaming: bool = False,
        block_size: int = 1024,
        buffer_blocks: int = 4,
        split: str = "random",
        **kwargs: Any,
    ) -> None:
        super().__init__(path, template=template, split=split, **kwargs)
        if block_size < 1:
            raise ValueError(f"block_size must be >= 1, got {block_size}")
        if split == "group" and group_column is None:
            raise ValueError("split: group needs group_column (an obs column such as a donor id)")
        if streaming and split != "random":
            raise ValueError(f"streaming splits by blocks of rows; split must be 'random', got {split!r}")
        self.id_column, self.group_column = id_column, group_column
        self.streaming, self.block_size, self.buffer_blocks = streaming, block_size, buffer_blocks
        self.streams: dict[str, CellStream] = {}

    def valid_splits(self) -> tuple[str, ...]:
        return ("random", "group")

    @property
    def featurizer(self) -> CellFeaturizer:
        if self.model is None:
            raise RuntimeError("call attach(model) (or run under a Trainer) first")
        featurizer = self.model.featurizers.get("cell")
        if not isinstance(featurizer, CellFeaturizer):
            raise ValueError(f"the model has no cell encoder; it has {sorted(self.model.featurizers)}")
        return featurizer

    # -- in memory --------------------------------------------------------------------------------
    def read_adata(self, path: str) -> AnnData:
        """The AnnData at ``path`` (in memory); override to preprocess it further."""
        return read_anndata(path)

    def read_records(self, path: str, *, columns: list[str]) -> list[Record]:
        source = _source_name(path)
        adata = self.read_adata(path)
        if self.max_records is not None:
            adata = adata[: self.max_records]
        wanted = [*columns, *(c for c in (self.id_column, self.group_column) if c)]
        _check_obs(list(adata.obs.columns), wanted, source=source)
        cells = self.featurizer.rows(adata, source=source, check=self.on_error == "raise")
        ids = (
            [f"{source}:{v}" for v in adata.obs[self.id_column]]
            if self.id_column
            else _row_ids(adata.obs_names, source=source)
        )
        obs = adata.obs[list(dict.fromkeys(wanted))].to_dict(orient="records")
        return [
            Record(
                id=rid,
                values={"cell": [cell]},
                row=row,
                group=str(row[self.group_column]) if self.group_column else None,
            )
            for rid, cell, row in zip(ids, cells, obs, strict=True)
        ]

    # -- streaming --------------------------------------------------------------------------------
    def _build(self) -> None:
        if not self.streaming:
            super()._build()
            return
        assert self.model is not None
        for p in (self.path, self.val_path, self.test_path, self.predict_path):
            if p is not None and not str(p).endswith(".h5ad"):
                raise ValueError(f"streaming reads .h5ad files, got {p!r}")
        fields = self.template.fields() + ([self.id_column] if self.id_column else [])
        n = self._inspect(self.path, fields)
        blocks = self._blocks(n)
        if self.val_path or self.test_path:
            parts = {"train": (self.path, blocks)}
            for name, p in (("val", self.val_path), ("test", self.test_path)):
                if p:
                    parts[name] = (p, self._blocks(self._inspect(p, fields)))
        else:
            idx = random_split(len(blocks), fractions=self.fractions, seed=self.seed)
            parts = {
                name: (self.path, [blocks[i] for i in ids])
                for name, ids in zip(("train", "val", "test"), idx, strict=True)
                if ids
            }
        if self.template.label is not None and not self.classes:
            h5py = require("h5py", extra=_EXTRA)
            path, train_blocks = parts["train"]
            with h5py.File(path, "r") as h5:
                labels = read_obs_columns(h5, [self.template.label])[self.template.label]
            self.classes = sorted({str(labels[i]) for a, b in train_blocks for i in range(a, b)})
        for name, (path, bl) in parts.items():
            self.streams[name] = self._stream(path, bl, shuffle=name == "train", need_answer=True)
        if self.predict_path:
            prompt_fields = Template(prompt=self.template.prompt).fields()
            self.streams["predict"] = self._stream(
                self.predict_path,
                self._blocks(self._inspect(self.predict_path, prompt_fields)),
                shuffle=False,
                need_answer=False,
            )
        sizes = {k: s.num_rows for k, s in self.streams.items()}
        rank_zero_info(f"scifm data (streaming {self.path}): {sizes} rows in blocks of {self.block_size}")

    def _inspect(self, path: str, fields: Sequence[str]) -> int:
        """Check columns and genes of a file without reading its matrix; returns its row count."""
        h5py = require("h5py", extra=_EXTRA)
        source = _source_name(path)
        with h5py.File(path, "r") as h5:
            read_obs_columns(h5, fields)
            genes = _h5_genes(h5, self.featurizer)
            element = _h5_matrix(h5, self.featurizer, source=source)
            n = int(element.shape[0])
        self.featurizer.alignment(genes, source=source)  # coverage report; duplicate genes refused
        return n if self.max_records is None else min(n, self.max_records)

    def _blocks(self, n: int) -> list[tuple[int, int]]:
        return [(a, min(a + self.block_size, n)) for a in range(0, n, self.block_size)]

    def _stream(
        self, path: str, blocks: list[tuple[int, int]], *, shuffle: bool, need_answer: bool
    ) -> CellStream:
        assert self.model is not None
        template = self.template if need_answer else Template(prompt=self.template.prompt)
        return CellStream(
            path,
            blocks=blocks,
            featurizer=self.featurizer,
            template=template,
            classes=self.classes,
            processor=self.model.processor(),
            columns=template.fields(),
            id_column=self.id_column,
            shuffle=shuffle,
            buffer_blocks=self.buffer_blocks,
            seed=self.seed,
            on_error=self.on_error,
            need_answer=need_answer,
        )

    def _loader(self, split: str, *, shuffle: bool, for_generation: bool = False) -> DataLoader[Any]:
        if not self.streaming:
            return super()._loader(split, shuffle=shuffle, for_generation=for_generation)
        if split not in self.streams:
            raise RuntimeError(f"no {split!r} data: give a {split}_path, or more blocks than splits")
        assert self.model is not None
        return DataLoader(
            self.streams[split],
            batch_size=self.batch_size,
            num_workers=self.num_workers,
            persistent_workers=self.num_workers > 0,
            collate_fn=self.model.collator(for_generation=for_generation),
        )

    def predict_dataloader(self) -> DataLoader[Any]:
        if self.streaming:
            split = "predict" if "predict" in self.streams else "test"
            return self._loader(split, shuffle=False, for_generation=True)
        return super().predict_dataloader()


# ---------------------------------------------------------------------------- drug response


class DrugResponseDataModule(CellDataModule):
    """Perturbation screens: (control cell, drug, dose, time) -> expression change.

    The file is an ``.h5ad`` with one cell per row (sci-Plex / chemCPA convention) and ``obs``
    columns for the drug's SMILES, its dose, the time point, a control flag (vehicle cells,
    e.g. DMSO) and the cell line. For each treated cell, the sample's ``<cell>`` is a control
    cell of the same line (drawn with ``seed``), its ``<mol>`` the drug, and its target

    .. math:: \\Delta = x_{\\text{treated}} - \\bar{x}_{\\text{control}}(\\text{cell line})

    over the model's genes, in the featurizer's processed space (log1p-normalized for counts).
    The model's head must be ``kind: regression`` with ``num_outputs`` = number of genes; the
    template has no ``targets`` (the data module supplies :math:`\\Delta`), and its answer may
    use ``{top_up}`` / ``{top_down}``: the ``top_genes`` genes of largest / smallest
    :math:`\\Delta`, comma-separated. Other template fields: the drug, dose, time and cell-line
    columns' values, under their column names.

    Args:
        path: the ``.h5ad`` file.
        template: template name, path or mapping (default: ``"cell_drug_response"``, which reads
            ``dose`` and ``time``).
        smiles_column, dose_column, time_column, control_column, cell_line_column: ``obs``
            columns (defaults: ``"smiles"``, ``"dose"``, ``"time"``, ``"control"``,
            ``"cell_line"``). ``time_column`` may be None. The control flag is boolean or 0/1.
        top_genes: genes named in ``{top_up}`` / ``{top_down}`` (default: 5).
        split: ``"random"`` over treated cells, or ``"drug"``: no drug shared between train,
            val and test (default: "random").

    Attributes:
        control_means: cell line -> ``(G,)`` mean control profile (after :meth:`setup`; of the
            first file that holds the line), to turn predicted deltas back into expression.
        cell_line_of, condition_of: record id -> its cell line, and its condition
            (``"line|smiles|dose|time"``, the ``groups`` of :func:`drug_response_r2`).
    """

    def __init__(
        self,
        path: str,
        *,
        template: str | dict[str, Any] = "cell_drug_response",
        smiles_column: str = "smiles",
        dose_column: str = "dose",
        time_column: str | None = "time",
        control_column: str = "control",
        cell_line_column: str = "cell_line",
        top_genes: int = 5,
        id_column: str | None = None,
        split: str = "random",
        **kwargs: Any,
    ) -> None:
        super().__init__(
            path,
            template=template,
            id_column=id_column,
            split=split if split != "drug" else "group",
            group_column=smiles_column if split == "drug" else None,
            **kwargs,
        )
        if top_genes < 1:
            raise ValueError(f"top_genes must be >= 1, got {top_genes}")
        self.smiles_column, self.dose_column, self.time_column = smiles_column, dose_column, time_column
        self.control_column, self.cell_line_column = control_column, cell_line_column
        self.top_genes = top_genes
        self.control_means: dict[str, np.ndarray] = {}
        self.cell_line_of: dict[str, str] = {}
        self.condition_of: dict[str, str] = {}

    def valid_splits(self) -> tuple[str, ...]:
        return ("random", "group")

    def attach(self, model: Any) -> None:
        super().attach(model)
        head = model.config.head
        genes = self.featurizer.num_genes
        if head.kind != "regression" or head.num_outputs != genes:
            raise ValueError(
                f"drug response needs head.kind: regression with num_outputs = {genes} "
                "(the featurizer's genes); "
                f"the model has head.kind={head.kind!r}, num_outputs={head.num_outputs}"
            )
        if "molecule" not in model.featurizers:
            raise ValueError("drug response needs a molecule encoder too (encoders: [cell, molecule])")

    def read_records(self, path: str, *, columns: list[str]) -> list[Record]:
        source = _source_name(path)
        adata = self.read_adata(path)
        own = [self.smiles_column, self.dose_column, self.control_column, self.cell_line_column]
        own += [self.time_column] if self.time_column else []
        template_cols = [c for c in columns if c not in ("top_up", "top_down")]
        _check_obs(list(adata.obs.columns), [*own, *template_cols], source=source)
        featurizer = self.featurizer
        cells = featurizer.rows(adata, source=source, check=True)
        ids = _row_ids(adata.obs_names, source=source)
        control = _as_bool(
            adata.obs[self.control_column].to_numpy(), column=self.control_column, source=source
        )
        lines = adata.obs[self.cell_line_column].astype(str).to_numpy()
        profiles = np.stack([featurizer(c, record=i).values.numpy() for c, i in zip(cells, ids, strict=True)])
        rng = np.random.default_rng(self.seed)
        controls_of: dict[str, np.ndarray] = {}
        for line in np.unique(lines):
            members = np.flatnonzero(control & (lines == line))
            if members.size == 0:
                raise InvalidInputError(
                    source, f"cell line {line!r} has no control cells ({self.control_column})"
                )
            controls_of[line] = members
            self.control_means.setdefault(line, profiles[members].mean(axis=0))
        genes = np.asarray(featurizer.genes)
        obs = adata.obs.to_dict(orient="records")
        records = []
        for i in np.flatnonzero(~control):
            line = lines[i]
            delta = profiles[i] - self.control_means[line]
            order = np.argsort(delta, kind="stable")
            row = {c: obs[i][c] for c in dict.fromkeys([*own, *template_cols])}
            row["top_up"] = ", ".join(genes[order[::-1][: self.top_genes]])
            row["top_down"] = ", ".join(genes[order[: self.top_genes]])
            row["delta"] = delta.astype(np.float32)
            condition = [line, row[self.smiles_column], row[self.dose_column]]
            condition += [row[self.time_column]] if self.time_column else []
            self.cell_line_of[ids[i]] = line
            self.condition_of[ids[i]] = "|".join(str(c) for c in condition)
            ctrl = int(rng.choice(controls_of[line]))
            records.append(
                Record(
                    id=ids[i],
                    values={"cell": [cells[ctrl]], "molecule": [row[self.smiles_column]]},
                    row=row,
                    group=str(row[self.smiles_column]) if self.group_column else None,
                )
            )
        return records

    def _sample(self, rec: Record, *, need_answer: bool) -> Sample:
        sample = super()._sample(rec, need_answer=need_answer)
        if need_answer:
            sample.target = [float(v) for v in rec.row["delta"]]
        return sample


def _as_bool(values: np.ndarray, *, column: str, source: str) -> np.ndarray:
    if values.dtype == bool:
        return values
    try:
        numeric = values.astype(float)
    except (TypeError, ValueError):
        text = np.char.lower(values.astype(str))
        if not np.isin(text, ["true", "false"]).all():
            raise InvalidInputError(source, f"obs column {column!r} must be boolean or 0/1") from None
        return np.asarray(text == "true")
    if not np.isin(numeric, [0.0, 1.0]).all():
        raise InvalidInputError(source, f"obs column {column!r} must be boolean or 0/1")
    return numeric == 1.0


# ---------------------------------------------------------------------------- metrics


def _r2(true: np.ndarray, pred: np.ndarray) -> float:
    ss_res = float(((true - pred) ** 2).sum())
    ss_tot = float(((true - true.mean()) ** 2).sum())
    return 1.0 - ss_res / ss_tot if ss_tot > 0 else math.nan


def drug_response_r2(
    pred: np.ndarray | torch.Tensor,
    true: np.ndarray | torch.Tensor,
    control: np.ndarray | torch.Tensor,
    *,
    top_de: int = 50,
    groups: Sequence[Any] | None = None,
    mean_effect: np.ndarray | torch.Tensor | None = None,
) -> dict[str, float]:
    """R² of mean post-treatment expression, as in CPA / chemCPA, with two baselines.

    For each condition (a drug at a dose in a cell line: a value of ``groups``), the mean
    predicted and the mean true expression are compared across genes: over all genes, and over
    the condition's ``top_de`` differentially expressed genes (largest ``|mean true - control|``).
    The scores are averaged over conditions. Baselines: "no change" predicts the control mean;
    "mean drug effect" predicts control + the mean change over all conditions (``mean_effect``,
    or computed from ``true``: pass one estimated on training data to avoid using test labels).

    Args:
        pred, true: ``(N, G)`` predicted and measured expression of treated cells.
        control: ``(G,)`` control mean, or ``(N, G)`` the control mean matching each row.
        top_de: number of DE genes per condition (default: 50).
        groups: ``(N,)`` condition of each row (default: all rows are one condition).
        mean_effect: ``(G,)`` mean change for the "mean drug effect" baseline (default: from ``true``).

    Returns:
        ``r2_all``, ``r2_de`` (the predictions), ``r2_all_no_change``, ``r2_de_no_change``,
        ``r2_all_mean_effect``, ``r2_de_mean_effect`` and ``num_conditions``.
    """
    p = np.asarray(pred, dtype=np.float64)
    t = np.asarray(true, dtype=np.float64)
    if p.shape != t.shape or p.ndim != 2:
        raise ValueError(f"pred and true must both be (N, G), got {p.shape} and {t.shape}")
    c = np.broadcast_to(np.asarray(control, dtype=np.float64), t.shape)
    keys = np.asarray(groups, dtype=object) if groups is not None else np.zeros(len(t), dtype=object)
    if len(keys) != len(t):
        raise ValueError(f"groups has {len(keys)} entries for {len(t)} rows")
    effect = np.asarray(mean_effect, dtype=np.float64) if mean_effect is not None else (t - c).mean(axis=0)
    scores: dict[str, list[float]] = {
        k: [] for k in ("all", "de", "all_no_change", "de_no_change", "all_mean_effect", "de_mean_effect")
    }
    for key in dict.fromkeys(keys.tolist()):
        rows = keys == key
        t_mean, p_mean, c_mean = t[rows].mean(0), p[rows].mean(0), c[rows].mean(0)
        de = np.argsort(-np.abs(t_mean - c_mean), kind="stable")[: min(top_de, t.shape[1])]
        for name, guess in (("", p_mean), ("_no_change", c_mean), ("_mean_effect", c_mean + effect)):
            scores[f"all{name}"].append(_r2(t_mean, guess))
            scores[f"de{name}"].append(_r2(t_mean[de], guess[de]))
    out = {
        f"r2_{k}": float(np.nanmean(v)) if not all(math.isnan(x) for x in v) else math.nan
        for k, v in scores.items()
    }
    out["num_conditions"] = float(len(dict.fromkeys(keys.tolist())))
    return out
