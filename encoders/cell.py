"""Single cells: an expression profile -> a vector over the model's gene vocabulary -> tokens.

Read top to bottom: reading AnnData (:func:`read_anndata`, :func:`read_gene_list`), the checks
that refuse unusable matrices (:func:`check_expression`), :class:`CellFeaturizer` (one cell ->
a :class:`CellItem` aligned to the model's genes by name), and the two encoders,
:class:`CellMLPEncoder` (the whole vector -> ``K`` tokens) and :class:`CellTransformerEncoder`
(the ``top_k`` most expressed genes as tokens, rank-value style).

The gene vocabulary is fixed when the model is built: ``featurizer.genes`` names the genes
(a list, a text file, or an ``.h5ad`` whose ``var_names`` to use) and the encoder's
``num_genes`` must equal its length. Data with other genes, or the same genes in another
order, is aligned by name; missing genes are zero-filled and the coverage is reported.

anndata and scanpy are imported where they are used, so importing this module is cheap and
works without the ``cell`` extra.
"""

from __future__ import annotations

import collections
import logging
import os
import re
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import torch
from torch import Tensor, nn

from scifm._extras import require
from scifm.errors import InvalidInputError

if TYPE_CHECKING:
    from anndata import AnnData

__all__ = [
    "SCANPY_DATASETS",
    "CellFeaturizer",
    "CellItem",
    "CellMLPEncoder",
    "CellRow",
    "CellTransformerEncoder",
    "DataKind",
    "as_cell_rows",
    "check_expression",
    "read_anndata",
    "read_gene_list",
]

log = logging.getLogger(__name__)

_EXTRA = "cell"

#: What a matrix holds. ``counts``: raw UMI/read counts (normalized to ``target_sum`` per cell,
#: then ``log1p``, as ``scanpy.pp.normalize_total`` + ``scanpy.pp.log1p``); ``log_normalized``:
#: already ``log1p`` of normalized counts (used as is); ``processed``: anything else already
#: transformed (scaled, z-scored; negative values allowed), used as is.
DataKind = Literal["counts", "log_normalized", "processed"]
_DATA_KINDS: tuple[str, ...] = ("counts", "log_normalized", "processed")

#: Datasets bundled with scanpy (no download), readable as ``"scanpy:<name>"``.
SCANPY_DATASETS: tuple[str, ...] = ("pbmc68k_reduced", "krumsiek11")

# log1p of counts normalized to 1e4 (scanpy's default) stays below ~10, to 1e6 below ~14.
_MAX_LOG_VALUE = 30.0
_ENSEMBL_VERSION = re.compile(r"^(ENS[A-Z]*[GTP]\d{6,})\.\d+$")
_ALIGN_CACHE = 8


# ---------------------------------------------------------------------------- reading


def read_anndata(source: str | os.PathLike[str] | AnnData, *, backed: bool = False) -> AnnData:
    """An AnnData from an object, an ``.h5ad`` path, or ``"scanpy:<name>"`` (a bundled dataset).

    Args:
        source: an ``AnnData`` (returned as is), a path to an ``.h5ad`` file, or
            ``"scanpy:pbmc68k_reduced"`` / ``"scanpy:krumsiek11"`` (shipped with scanpy, offline).
        backed: open an ``.h5ad`` in backed mode (``X`` stays on disk) (default: False).

    Raises:
        FileNotFoundError: the path does not exist.
        ValueError: an unknown ``scanpy:`` name, or a file that is not ``.h5ad``.
    """
    ad = require("anndata", extra=_EXTRA)
    if isinstance(source, ad.AnnData):
        return source
    text = str(source)
    if text.startswith("scanpy:"):
        name = text.removeprefix("scanpy:")
        if name not in SCANPY_DATASETS:
            raise ValueError(
                f"unknown bundled dataset {text!r}; valid: {[f'scanpy:{n}' for n in SCANPY_DATASETS]}"
            )
        sc = require("scanpy", extra=_EXTRA)
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", message=".*names are not unique.*")
            adata = getattr(sc.datasets, name)()
        return adata
    path = Path(text).expanduser()
    if not path.is_file():
        raise FileNotFoundError(f"no such file: {text!r}")
    if path.suffix != ".h5ad":
        raise ValueError(
            f"{text!r} is not an .h5ad file; convert it with anndata (e.g. sc.read_10x_mtx(...).write_h5ad)"
        )
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=".*names are not unique.*")
        return ad.read_h5ad(path, backed="r" if backed else None)


def read_gene_list(
    source: str | os.PathLike[str] | Sequence[str], *, gene_column: str | None = None
) -> list[str]:
    """The gene names of a vocabulary source.

    Args:
        source: a list of names; a text file with one name per line (blank lines and ``#``
            comments skipped); an ``.h5ad`` file or ``"scanpy:<name>"`` whose genes to use.
        gene_column: for an ``.h5ad``, the ``var`` column holding the names (e.g. ``"gene_ids"``
            for Ensembl ids) instead of ``var_names`` (default: None).

    Raises:
        FileNotFoundError: the file does not exist.
        ValueError: the list is empty, or names repeat (the duplicates are listed).
    """
    if isinstance(source, (str, os.PathLike)):
        text = str(source)
        if text.startswith("scanpy:") or text.endswith(".h5ad"):
            adata = read_anndata(text, backed=text.endswith(".h5ad"))
            genes = _var_names(adata.var, gene_column=gene_column, source=text)
            if adata.isbacked:
                adata.file.close()
        else:
            path = Path(text).expanduser()
            if not path.is_file():
                raise FileNotFoundError(
                    f"no such gene list: {text!r} (give a .txt with one gene per line or an .h5ad)"
                )
            genes = [s for line in path.read_text().splitlines() if (s := line.split("#")[0].strip())]
        name = text
    else:
        genes, name = [str(g) for g in source], "genes"
    if not genes:
        raise ValueError(f"the gene list {name!r} is empty")
    _check_unique(genes, source=name)
    return genes


def _var_names(var: Any, *, gene_column: str | None, source: str) -> list[str]:
    if gene_column is None:
        return [str(g) for g in var.index]
    if gene_column not in var.columns:
        raise InvalidInputError(
            source,
            f"var has no column {gene_column!r} (gene_column); columns: {[str(c) for c in var.columns]}",
        )
    return [str(g) for g in var[gene_column]]


def _check_unique(genes: Sequence[str], *, source: str) -> None:
    dups = [g for g, n in collections.Counter(genes).items() if n > 1]
    if dups:
        raise InvalidInputError(
            source,
            f"{len(dups)} duplicate gene name(s) {dups[:5]}; genes are matched by name, so make them unique "
            "(adata.var_names_make_unique(), or pick gene_column='gene_ids' for Ensembl ids)",
        )


def _gene_key(name: str) -> str:
    """Match Ensembl ids across releases (``ENSG00000141510.17`` -> ``ENSG00000141510``)."""
    m = _ENSEMBL_VERSION.match(name)
    return m.group(1) if m else name


# ---------------------------------------------------------------------------- checks


def _locate(matrix: Any, flat: int) -> tuple[int, int]:
    """Row and column of the ``flat``-th stored value of a dense array or CSR/CSC matrix."""
    sparse = require("scipy.sparse", extra=_EXTRA)
    if sparse.issparse(matrix):
        major = int(np.searchsorted(matrix.indptr, flat, side="right") - 1)
        minor = int(matrix.indices[flat])
        return (major, minor) if matrix.format == "csr" else (minor, major)
    row, col = np.unravel_index(flat, matrix.shape)
    return int(row), int(col)


def _stored(matrix: Any) -> np.ndarray:
    sparse = require("scipy.sparse", extra=_EXTRA)
    if sparse.issparse(matrix):
        if matrix.format not in ("csr", "csc"):
            raise TypeError(f"expected a CSR/CSC matrix, got {matrix.format}")
        return np.asarray(matrix.data)
    return np.asarray(matrix).reshape(-1)


def check_expression(
    matrix: Any,
    *,
    data: DataKind,
    source: str,
    genes: Sequence[str] | None = None,
    row_names: Sequence[str] | None = None,
) -> None:
    """Refuse a matrix (cells x genes) that does not hold what ``data`` declares.

    Checks: no NaN or infinite value; for ``counts`` and ``log_normalized``, no negative value
    (scaled data); for ``counts``, integers only; for ``log_normalized``, not raw counts
    (integers only, or values above 30). Vectorized over the stored values: O(nnz).

    Args:
        matrix: ``(N, G)`` dense array or CSR/CSC matrix.
        data: what the matrix is declared to hold (see :data:`DataKind`).
        source: the dataset (file name, ``"cells[3]"``), named in the error.
        genes, row_names: names of the columns / rows, to point at the first bad value.

    Raises:
        InvalidInputError: naming ``source``, the problem, and the first offending cell and gene.
    """
    if data not in _DATA_KINDS:
        raise ValueError(f"unknown data kind {data!r}; valid: {list(_DATA_KINDS)}")
    values = _stored(matrix)
    if values.size == 0:
        return

    def where(flat: int) -> str:
        row, col = _locate(matrix, flat)
        cell = row_names[row] if row_names is not None else f"row {row}"
        gene = genes[col] if genes is not None else f"column {col}"
        return f"cell {cell}, gene {gene}"

    bad = ~np.isfinite(values)
    if bad.any():
        first = int(np.argmax(bad))
        raise InvalidInputError(
            source,
            f"{int(bad.sum())} NaN or infinite value(s), the first at {where(first)}; fill or drop them",
        )
    if data == "processed":
        return
    negative = values < 0
    if negative.any():
        first = int(np.argmax(negative))
        raise InvalidInputError(
            source,
            f"{int(negative.sum())} negative value(s) (e.g. {values[first]:.4g} at {where(first)}), "
            "but data: "
            f"{data} declares non-negative expression; this looks scaled or centered (sc.pp.scale). "
            "Read the unscaled values (layer=..., use_raw=True) or declare data: processed",
        )
    integral = values == np.round(values)
    vmax = float(values.max())
    if data == "counts" and not integral.all():
        first = int(np.argmax(~integral))
        raise InvalidInputError(
            source,
            f"data: counts declares raw counts, but it holds non-integer values (e.g. {values[first]:.4g} at "
            f"{where(first)}); it looks normalized or log-transformed: declare data: log_normalized, or read "
            "the raw counts (layer='counts')",
        )
    if data == "log_normalized" and ((integral.all() and vmax >= 2) or vmax > _MAX_LOG_VALUE):
        first = int(np.argmax(values))
        raise InvalidInputError(
            source,
            "data: log_normalized was declared, but these look like raw counts "
            f"(integers only, max {vmax:.4g} "
            f"at {where(first)}); declare data: counts so that normalize_total + log1p are applied",
        )


# ---------------------------------------------------------------------------- items


@dataclass(frozen=True)
class CellRow:
    """One cell as read from a dataset, before alignment to the model's genes.

    Data modules build these in bulk (one read and one check per dataset); users may pass
    them too. ``values`` is a ``(G_data,)`` array or a ``1 x G_data`` sparse row in the order
    of ``genes``; rows of one dataset share the same ``genes`` tuple, so the alignment is
    computed once. ``checked`` says :func:`check_expression` already passed on the dataset.
    """

    values: Any
    genes: tuple[str, ...]
    checked: bool = False


@dataclass(frozen=True)
class CellItem:
    """A featurized cell: ``values`` ``(G,)`` float32 over the model's genes, processed as
    declared (log1p-normalized for counts). ``num_tokens`` is the featurizer's
    ``tokens_per_cell`` (needed only with ``connector.kind: mlp``)."""

    values: Tensor
    num_tokens: int | None = None


@dataclass
class _Alignment:
    src: np.ndarray  # positions in the dataset's gene order
    dst: np.ndarray  # positions in the model's gene order
    coverage: float


class CellFeaturizer:
    r"""Turn one cell into a :class:`CellItem` aligned to the model's gene vocabulary.

    The vocabulary is fixed here, before any data is read, and stored by :meth:`config` (so a
    saved model keeps it in ``config.json``). Input genes are matched by name (Ensembl version
    suffixes ignored, case kept); model genes the data lacks are zero-filled, data genes the
    model lacks are dropped, and the result does not depend on the data's gene order. For
    ``counts``, each cell is normalized over *all* its genes before alignment, as
    ``scanpy.pp.normalize_total(target_sum=...)`` then ``scanpy.pp.log1p`` would.

    Accepted values: a one-cell ``AnnData`` (``adata[i]``; ``X``, ``layers[layer]`` or ``raw``
    as configured), a :class:`CellRow`, a mapping or ``pandas.Series`` gene -> value.

    Args:
        genes: the vocabulary: a list of names, a text file (one per line), an ``.h5ad`` or
            ``"scanpy:<name>"`` whose genes to use. Required.
        n_top_genes: when ``genes`` is a dataset, keep only its ``n`` most highly variable genes
            (``scanpy.pp.highly_variable_genes``, Seurat flavor, on the log-normalized data;
            the dataset is read into memory once) (default: None, all genes).
        data: what the input holds, see :data:`DataKind` (default: ``"counts"``).
        layer: read ``adata.layers[layer]`` instead of ``X`` (default: None).
        use_raw: read ``adata.raw`` (``X`` and ``var``) instead (default: False).
        gene_column: ``var`` column with the gene names (``"gene_ids"`` for Ensembl) instead of
            ``var_names`` (default: None).
        target_sum: total each cell is scaled to before ``log1p``, for ``counts`` (default: 1e4).
        min_coverage: warn when a dataset holds fewer than this fraction of the model's genes
            (default: 0.5). No shared gene at all is an error.
        tokens_per_cell: soft tokens per cell; set it (to the encoder's ``num_tokens`` /
            ``top_k``) only with ``connector.kind: mlp`` (default: None).

    Raises:
        ValueError: no ``genes``, duplicate names, or a bad setting.
    """

    def __init__(
        self,
        *,
        genes: list[str] | str | None = None,
        n_top_genes: int | None = None,
        data: DataKind = "counts",
        layer: str | None = None,
        use_raw: bool = False,
        gene_column: str | None = None,
        target_sum: float = 1e4,
        min_coverage: float = 0.5,
        tokens_per_cell: int | None = None,
    ) -> None:
        if genes is None or (isinstance(genes, (list, tuple)) and not genes):
            raise ValueError(
                "CellFeaturizer needs genes=: the model's gene vocabulary (a list, a text file with one "
                "gene per line, or an .h5ad whose var_names to use); set encoders[cell].featurizer.genes "
                "and encoders[cell].params.num_genes to its length"
            )
        if data not in _DATA_KINDS:
            raise ValueError(f"unknown data {data!r}; valid: {list(_DATA_KINDS)}")
        if layer is not None and use_raw:
            raise ValueError("give either layer= or use_raw=True, not both")
        if not target_sum > 0:
            raise ValueError(f"target_sum must be positive, got {target_sum}")
        if not 0.0 <= min_coverage <= 1.0:
            raise ValueError(f"min_coverage must lie in [0, 1], got {min_coverage}")
        if tokens_per_cell is not None and tokens_per_cell < 1:
            raise ValueError(f"tokens_per_cell must be >= 1, got {tokens_per_cell}")
        self.data: DataKind = data
        self.layer, self.use_raw, self.gene_column = layer, use_raw, gene_column
        self.target_sum, self.min_coverage = float(target_sum), float(min_coverage)
        self.tokens_per_cell = tokens_per_cell
        if n_top_genes is not None:
            if not isinstance(genes, str) or not (genes.endswith(".h5ad") or genes.startswith("scanpy:")):
                raise ValueError("n_top_genes needs genes= to be an .h5ad path or 'scanpy:<name>'")
            self.genes = self._highly_variable(genes, n_top_genes)
        else:
            self.genes = self._resolve_genes(genes)
        keys = [_gene_key(g) for g in self.genes]
        _check_unique(keys, source="featurizer.genes")
        self._index = {k: i for i, k in enumerate(keys)}
        self._alignments: dict[tuple[str, ...], _Alignment] = {}

    @property
    def num_genes(self) -> int:
        return len(self.genes)

    def config(self) -> dict[str, Any]:
        """Settings as plain data; ``genes`` is the resolved list, so a saved model needs no file."""
        return {
            "genes": list(self.genes),
            "n_top_genes": None,
            "data": self.data,
            "layer": self.layer,
            "use_raw": self.use_raw,
            "gene_column": self.gene_column,
            "target_sum": self.target_sum,
            "min_coverage": self.min_coverage,
            "tokens_per_cell": self.tokens_per_cell,
        }

    def __repr__(self) -> str:
        return f"{type(self).__name__}(num_genes={self.num_genes}, data={self.data!r}, layer={self.layer!r})"

    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_alignments"] = {}  # a cache; rebuilt in each worker
        return state

    # -- datasets ------------------------------------------------------------------------------
    def matrix(self, adata: AnnData) -> tuple[Any, list[str]]:
        """The configured matrix of ``adata`` (``X``, a layer or ``raw.X``) and its gene names.

        Raises:
            InvalidInputError: the layer, ``raw`` or ``gene_column`` is missing (names the options).
        """
        source = _describe(adata)
        if self.use_raw:
            if adata.raw is None:
                raise InvalidInputError(source, "use_raw=True but the AnnData has no .raw")
            return adata.raw.X, _var_names(adata.raw.var, gene_column=self.gene_column, source=source)
        genes = _var_names(adata.var, gene_column=self.gene_column, source=source)
        if self.layer is None:
            return adata.X, genes
        if self.layer not in adata.layers:
            raise InvalidInputError(source, f"no layer {self.layer!r}; layers: {list(adata.layers)}")
        return adata.layers[self.layer], genes

    def rows(self, adata: AnnData, *, source: str, check: bool = True) -> list[CellRow]:
        """Check a whole in-memory dataset once and split it into :class:`CellRow`\\ s.

        Args:
            adata: the dataset (in memory; use a data module's streaming mode for larger files).
            source: its name in errors and in the coverage report.
            check: run :func:`check_expression` on the whole matrix now (default: True); False
                leaves the checks to each cell (so ``on_error: skip`` can drop bad cells one by one).

        Raises:
            InvalidInputError: see :func:`check_expression`; duplicate gene names; no shared gene.
        """
        sparse = require("scipy.sparse", extra=_EXTRA)
        matrix, genes = self.matrix(adata)
        matrix = sparse.csr_matrix(matrix) if sparse.issparse(matrix) else np.asarray(matrix)
        names = tuple(genes)
        self.alignment(names, source=source)
        if check:
            check_expression(
                matrix, data=self.data, source=source, genes=names, row_names=list(adata.obs_names)
            )
        return [CellRow(matrix[i], names, checked=check) for i in range(matrix.shape[0])]

    def alignment(self, genes: Sequence[str], *, source: str) -> _Alignment:
        """Where a dataset's genes go in the model's vocabulary (cached per gene list).

        Logs the coverage; warns below ``min_coverage``.

        Raises:
            InvalidInputError: duplicate gene names in the data, or no gene in common.
        """
        names = tuple(genes)
        found = self._alignments.get(names)
        if found is not None:
            return found
        keys = [_gene_key(g) for g in names]
        _check_unique(keys, source=source)
        pairs = [(j, self._index[k]) for j, k in enumerate(keys) if k in self._index]
        if not pairs:
            raise InvalidInputError(
                source,
                f"none of its {len(names)} genes (e.g. {list(names[:3])}) is in the model's vocabulary "
                f"(e.g. {self.genes[:3]}); symbols vs Ensembl ids? set gene_column",
            )
        src = np.fromiter((p[0] for p in pairs), dtype=np.int64, count=len(pairs))
        dst = np.fromiter((p[1] for p in pairs), dtype=np.int64, count=len(pairs))
        coverage = len(pairs) / self.num_genes
        message = (
            f"{source}: {len(pairs)} of the model's {self.num_genes} genes found ({coverage:.1%}); "
            f"{self.num_genes - len(pairs)} zero-filled, {len(names) - len(pairs)} of the data's genes unused"
        )
        if coverage < self.min_coverage:
            warnings.warn(f"{message}; below min_coverage={self.min_coverage:.0%}", UserWarning, stacklevel=3)
        else:
            log.info(message)
        alignment = _Alignment(src, dst, coverage)
        if len(self._alignments) >= _ALIGN_CACHE:
            self._alignments.pop(next(iter(self._alignments)))
        self._alignments[names] = alignment
        return alignment

    def coverage(self, genes: Sequence[str]) -> float:
        """Fraction of the model's genes present in ``genes``."""
        return self.alignment(genes, source="genes").coverage

    # -- one cell ------------------------------------------------------------------------------
    def __call__(self, value: Any, *, record: str) -> CellItem:
        """Featurize one cell.

        Returns:
            CellItem: ``values`` ``(G,)`` float32 over ``self.genes``.

        Raises:
            InvalidInputError: an unsupported value, an AnnData with more than one cell, bad
                values (see :func:`check_expression`), a cell without counts, or no shared gene.
        """
        sparse = require("scipy.sparse", extra=_EXTRA)
        row, genes, checked = self._read(value, record=record)
        if sparse.issparse(row):
            row = sparse.csr_matrix(row)
            if row.shape[0] != 1:
                raise InvalidInputError(
                    record, f"expected one cell, got a {row.shape[0]} x {row.shape[1]} matrix"
                )
            dense = np.zeros(row.shape[1], dtype=np.float64)
            dense[row.indices] = row.data
        else:
            dense = np.asarray(row, dtype=np.float64).reshape(-1)
        if dense.shape[0] != len(genes):
            raise InvalidInputError(record, f"{dense.shape[0]} values but {len(genes)} gene names")
        if not checked:
            check_expression(
                dense.reshape(1, -1), data=self.data, source=record, genes=genes, row_names=[record]
            )
        if self.data == "counts":
            total = dense.sum()
            if total <= 0:
                raise InvalidInputError(record, "the cell has no counts (all zero); it cannot be normalized")
            dense = np.log1p(dense * (self.target_sum / total))
        alignment = self.alignment(genes, source=record)
        kept = dense[alignment.src]
        too_big = np.abs(kept) > np.finfo(np.float32).max
        if too_big.any():
            gene = genes[int(alignment.src[np.flatnonzero(too_big)[0]])]
            raise InvalidInputError(
                record, f"gene {gene!r} has the value {kept[too_big][0]:.3g}, beyond float32's range"
            )
        out = np.zeros(self.num_genes, dtype=np.float32)
        out[alignment.dst] = kept
        return CellItem(torch.from_numpy(out), self.tokens_per_cell)

    def _read(self, value: Any, *, record: str) -> tuple[Any, tuple[str, ...], bool]:
        if isinstance(value, CellRow):
            return value.values, value.genes, value.checked
        if isinstance(value, Mapping):
            return np.asarray(list(value.values()), dtype=np.float64), tuple(str(k) for k in value), False
        if type(value).__name__ == "Series" and hasattr(value, "index"):
            return np.asarray(value.to_numpy(), dtype=np.float64), tuple(str(k) for k in value.index), False
        if type(value).__name__ == "AnnData" or hasattr(value, "obs_names"):
            if value.n_obs != 1:
                raise InvalidInputError(
                    record, f"an AnnData of {value.n_obs} cells where one cell was expected; pass adata[i]"
                )
            matrix, genes = self.matrix(value)
            return matrix, tuple(genes), False
        raise InvalidInputError(
            record,
            f"expected a one-cell AnnData (adata[i]), a CellRow, or a gene -> value mapping; got "
            f"{type(value).__name__} (a bare vector has no gene names to align by)",
        )

    # -- vocabulary from data ------------------------------------------------------------------
    def _resolve_genes(self, genes: list[str] | str) -> list[str]:
        if (
            isinstance(genes, str)
            and self.use_raw
            and (genes.endswith(".h5ad") or genes.startswith("scanpy:"))
        ):
            adata = read_anndata(genes)  # the vocabulary of raw, which is what will be read
            _, names = self.matrix(adata)
            _check_unique(names, source=genes)
            return names
        return read_gene_list(genes, gene_column=self.gene_column if isinstance(genes, str) else None)

    def _highly_variable(self, source: str, n_top_genes: int) -> list[str]:
        sc = require("scanpy", extra=_EXTRA)
        adata = read_anndata(source)
        matrix, genes = self.matrix(adata)
        check_expression(matrix, data=self.data, source=source, genes=genes)
        ref = require("anndata", extra=_EXTRA).AnnData(X=matrix.copy())
        ref.var_names = genes
        if self.data == "counts":
            sc.pp.normalize_total(ref, target_sum=self.target_sum)
            sc.pp.log1p(ref)
        if n_top_genes >= ref.n_vars:
            return list(genes)
        sc.pp.highly_variable_genes(ref, n_top_genes=n_top_genes, flavor="seurat")
        return [g for g, keep in zip(genes, ref.var["highly_variable"], strict=True) if keep]


def _describe(adata: Any) -> str:
    filename = getattr(adata, "filename", None)
    return str(filename) if filename else f"AnnData ({adata.n_obs} x {adata.n_vars})"


def as_cell_rows(values: Any) -> list[Any]:
    """Split ``cells=`` of the predict API into one entry per prompt.

    Args:
        values: an ``AnnData`` (one prompt per cell), an ``.h5ad`` path or ``"scanpy:<name>"``
            (read into memory; one prompt per cell), or a list with one entry per prompt: a
            one-cell AnnData, a gene -> value mapping, a :class:`CellRow`, ``None`` (no cell in
            that prompt), or a list of those / a several-cell AnnData (several ``<cell>`` in
            that prompt).

    Returns:
        list: one entry per prompt (a cell, a list of cells, or ``None``).

    Raises:
        TypeError: a single cell that is not in a list, or a bare array (it has no gene names).
    """
    if isinstance(values, (str, os.PathLike)) or _is_anndata(values):
        adata = read_anndata(values)
        return [adata[i] for i in range(adata.n_obs)]
    if isinstance(values, (Mapping, CellRow)) or hasattr(values, "shape"):
        raise TypeError(
            "cells= takes an AnnData, an .h5ad path, or a list with one entry per prompt; "
            f"got {type(values).__name__} (wrap a single cell in a list; arrays need gene names)"
        )
    out: list[Any] = []
    for entry in values:
        if _is_anndata(entry) or isinstance(entry, (str, os.PathLike)):
            adata = read_anndata(entry)
            cells = [adata[i] for i in range(adata.n_obs)]
            out.append(cells[0] if len(cells) == 1 else cells)
        elif isinstance(entry, (list, tuple)):
            group: list[Any] = []
            for e in entry:
                if _is_anndata(e):
                    group += [e[i] for i in range(e.n_obs)]
                else:
                    group.append(e)
            out.append(group)
        else:
            out.append(entry)
    return out


def _is_anndata(value: Any) -> bool:
    return type(value).__name__ == "AnnData" and hasattr(value, "obs_names")


# ---------------------------------------------------------------------------- encoders


def _collate(items: list[CellItem]) -> dict[str, Tensor]:
    if not items:
        raise ValueError("collate needs at least one cell, got an empty list")
    sizes = {int(i.values.shape[0]) for i in items}
    if len(sizes) != 1:
        raise ValueError(f"cells of different gene vocabularies in one batch: sizes {sorted(sizes)}")
    tokens = [-1 if i.num_tokens is None else i.num_tokens for i in items]
    return {"values": torch.stack([i.values for i in items]), "num_tokens": torch.tensor(tokens)}


def _check_batch(batch: dict[str, Tensor], *, num_genes: int, tokens: int, what: str) -> Tensor:
    values = batch["values"]
    if values.shape[-1] != num_genes:
        raise ValueError(
            f"the featurizer gives {values.shape[-1]} genes per cell but the encoder was built with "
            f"num_genes={num_genes}: set encoders[cell].params.num_genes to the length of featurizer.genes"
        )
    declared = batch["num_tokens"]
    if bool((declared >= 0).any()) and bool((declared[declared >= 0] != tokens).any()):
        raise ValueError(
            f"featurizer.tokens_per_cell={int(declared.max())} but the encoder's {what} is {tokens}; "
            "make them equal"
        )
    return values


def _item_tokens_needed(item: CellItem) -> int:
    if item.num_tokens is None:
        raise ValueError(
            "connector.kind 'mlp' needs each cell's token count up front: set encoders[cell].featurizer."
            "tokens_per_cell to the encoder's num_tokens (mlp) or top_k (transformer), or use the resampler"
        )
    return item.num_tokens


def _check_sizes(dropout: float, **sizes: int) -> None:
    """Raise ValueError unless every size is >= 1 and ``dropout`` lies in [0, 1)."""
    for name, value in sizes.items():
        if value < 1:
            raise ValueError(f"{name} must be >= 1, got {value}")
    if not 0.0 <= dropout < 1.0:
        raise ValueError(f"dropout must be in [0, 1), got {dropout}")


class CellMLPEncoder(nn.Module):
    r"""An MLP over the whole aligned expression vector, read out as ``K`` tokens.

    .. math::
        \mathbf{h} = \mathrm{MLP}(\mathbf{x}) \in \mathbb{R}^{H},\qquad
        \mathbf{t}_k = \mathrm{LN}\big(\mathbf{W}_k \mathbf{h} + \mathbf{p}_k\big),\ k = 1..K

    Args:
        num_genes: ``G``, the length of the featurizer's gene list.
        hidden_dim: ``H``, width of the MLP and of the tokens (default: 256).
        num_tokens: ``K`` tokens per cell (default: 8).
        num_layers: hidden layers of the MLP (default: 2).
        dropout: dropout after each hidden layer (default: 0.0).

    Shapes:
        - **input:** ``{"values": (B, G), "num_tokens": (B,)}`` from :meth:`collate`
        - **output:** tokens ``(B, K, H)`` and an all-True mask ``(B, K)``
    """

    modality = "cell"

    def __init__(
        self,
        *,
        num_genes: int,
        hidden_dim: int = 256,
        num_tokens: int = 8,
        num_layers: int = 2,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        _check_sizes(
            dropout, num_genes=num_genes, hidden_dim=hidden_dim, num_tokens=num_tokens, num_layers=num_layers
        )
        self.num_genes, self.hidden_dim, self.num_tokens = num_genes, hidden_dim, num_tokens
        self.out_dim: int = hidden_dim
        layers: list[nn.Module] = []
        width = num_genes
        for _ in range(num_layers):
            layers += [nn.Linear(width, hidden_dim), nn.LayerNorm(hidden_dim), nn.GELU(), nn.Dropout(dropout)]
            width = hidden_dim
        self.mlp = nn.Sequential(*layers)
        self.readout = nn.Linear(hidden_dim, num_tokens * hidden_dim)
        self.positions = nn.Parameter(torch.zeros(num_tokens, hidden_dim))
        self.norm = nn.LayerNorm(hidden_dim)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.trunc_normal_(self.positions, std=0.02)

    def forward(self, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        """``(B, G)`` values -> tokens ``(B, K, H)``, mask ``(B, K)`` (all True)."""
        x = _check_batch(batch, num_genes=self.num_genes, tokens=self.num_tokens, what="num_tokens")
        h = self.mlp(x.float())
        tokens = self.norm(self.readout(h).view(-1, self.num_tokens, self.hidden_dim) + self.positions)
        return tokens, torch.ones(tokens.shape[:2], dtype=torch.bool, device=tokens.device)

    @staticmethod
    def item_tokens(item: CellItem) -> int:
        """``K``: the featurizer's ``tokens_per_cell`` (set it for ``connector.kind: mlp``)."""
        return _item_tokens_needed(item)

    @staticmethod
    def collate(items: list[CellItem]) -> dict[str, Tensor]:
        """Stack featurized cells: ``values`` ``(B, G)``, ``num_tokens`` ``(B,)`` (-1 = unset)."""
        return _collate(items)

    def extra_repr(self) -> str:
        return f"num_genes={self.num_genes}, hidden_dim={self.hidden_dim}, num_tokens={self.num_tokens}"


class CellTransformerEncoder(nn.Module):
    r"""A transformer over each cell's ``top_k`` most expressed genes (rank-value encoding).

    Genes are sorted by expression (ties by vocabulary position, so the order of the input
    data never matters); token ``r`` of a cell is

    .. math::
        \mathbf{t}_r = \mathbf{E}_{\text{gene}}[g_r] + \mathrm{MLP}(x_{g_r}) + \mathbf{E}_{\text{rank}}[r]

    followed by ``num_layers`` pre-norm transformer layers. Genes with expression ``<= 0`` are
    masked out, so a cell expressing fewer than ``top_k`` genes has fewer tokens (at least one).

    Args:
        num_genes: ``G``, the length of the featurizer's gene list.
        hidden_dim: ``H``, token width (default: 128).
        top_k: genes (tokens) per cell, ``min(top_k, G)`` (default: 64).
        num_layers: transformer layers (default: 2).
        num_heads: attention heads; must divide ``hidden_dim`` (default: 4).
        dropout: dropout inside the layers (default: 0.0).

    Shapes:
        - **input:** ``{"values": (B, G), "num_tokens": (B,)}`` from :meth:`collate`
        - **output:** tokens ``(B, k, H)`` (zeros at padding), mask ``(B, k)``, ``k = min(top_k, G)``
    """

    modality = "cell"

    def __init__(
        self,
        *,
        num_genes: int,
        hidden_dim: int = 128,
        top_k: int = 64,
        num_layers: int = 2,
        num_heads: int = 4,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        _check_sizes(
            dropout,
            num_genes=num_genes,
            hidden_dim=hidden_dim,
            top_k=top_k,
            num_layers=num_layers,
            num_heads=num_heads,
        )
        if hidden_dim % num_heads:
            raise ValueError(f"hidden_dim ({hidden_dim}) must be divisible by num_heads ({num_heads})")
        self.num_genes, self.hidden_dim, self.top_k = num_genes, hidden_dim, min(top_k, num_genes)
        self.out_dim: int = hidden_dim
        self.gene_embedding = nn.Embedding(num_genes, hidden_dim)
        self.rank_embedding = nn.Embedding(self.top_k, hidden_dim)
        self.value_embedding = nn.Sequential(
            nn.Linear(1, hidden_dim), nn.GELU(), nn.Linear(hidden_dim, hidden_dim)
        )
        layer = nn.TransformerEncoderLayer(
            hidden_dim,
            num_heads,
            dim_feedforward=4 * hidden_dim,
            dropout=dropout,
            activation="gelu",
            batch_first=True,
            norm_first=True,
        )
        self.layers = nn.TransformerEncoder(layer, num_layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(hidden_dim)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        # Unit-scale gene embeddings: gene identity is the main signal of a token, and must not
        # drown under the value embedding at initialization.
        nn.init.normal_(self.gene_embedding.weight, std=1.0)
        nn.init.normal_(self.rank_embedding.weight, std=0.02)

    def select(self, values: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        """``(B, G)`` -> gene ids ``(B, k)``, their values ``(B, k)``, mask ``(B, k)``."""
        order = torch.sort(values, dim=-1, descending=True, stable=True).indices[:, : self.top_k]
        top = values.gather(1, order)
        mask = top > 0
        mask[:, 0] = True  # a cell with nothing expressed still gets one token (no all-masked rows)
        return order, top, mask

    def forward(self, batch: dict[str, Tensor]) -> tuple[Tensor, Tensor]:
        """``(B, G)`` values -> tokens ``(B, k, H)``, mask ``(B, k)`` (True = a real gene)."""
        x = _check_batch(batch, num_genes=self.num_genes, tokens=self.top_k, what="top_k")
        genes, top, mask = self.select(x.float())
        ranks = torch.arange(genes.shape[1], device=genes.device)
        h = self.gene_embedding(genes) + self.value_embedding(top.unsqueeze(-1)) + self.rank_embedding(ranks)
        h = self.norm(self.layers(h, src_key_padding_mask=~mask))
        return h * mask.unsqueeze(-1).to(h.dtype), mask

    @staticmethod
    def item_tokens(item: CellItem) -> int:
        """``min(tokens_per_cell, genes expressed)``, at least 1 (set ``tokens_per_cell`` = ``top_k``)."""
        k = _item_tokens_needed(item)
        return max(1, min(k, int((item.values > 0).sum())))

    @staticmethod
    def collate(items: list[CellItem]) -> dict[str, Tensor]:
        """Stack featurized cells: ``values`` ``(B, G)``, ``num_tokens`` ``(B,)`` (-1 = unset)."""
        return _collate(items)

    def extra_repr(self) -> str:
        return f"num_genes={self.num_genes}, hidden_dim={self.hidden_dim}, top_k={self.top_k}"
