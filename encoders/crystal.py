"""Crystals: a pymatgen ``Structure`` / CIF / POSCAR -> periodic graph -> per-atom tokens.

Read top to bottom: :func:`read_structure` (any accepted input -> ``Structure``, with the
parser's own reason for a failure), :func:`check_structure` and :func:`parse_structure` (the
checks every featurizer applies: atoms present, ordered sites, no overlapping atoms),
:class:`CrystalFeaturizer` (``Structure`` -> PyG ``Data`` with a radius graph over periodic
images) and :class:`CGCNNEncoder` (gated graph convolutions -> one token per atom), then
:class:`CHGNetFeaturizer` / :class:`CHGNetEncoder` (the pretrained CHGNet's atom features as
tokens) and :func:`cif_validity` (how much of a batch of generated CIF text is a usable crystal).

pymatgen, PyTorch Geometric and CHGNet are imported where they are used, so importing this
module is cheap and works without the ``crystal`` extra.
"""

from __future__ import annotations

import contextlib
import io
import math
import os
import re
import warnings
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal, cast

import torch
from torch import Tensor, nn

from scifm._extras import require
from scifm.encoders._graph import GraphItems
from scifm.errors import InvalidInputError

if TYPE_CHECKING:
    from pymatgen.core import Structure
    from torch_geometric.data import Batch, Data

__all__ = [
    "CHGNET_MAX_ATOMIC_NUMBER",
    "MAX_ATOMIC_NUMBER",
    "CGCNNEncoder",
    "CHGNetBatch",
    "CHGNetEncoder",
    "CHGNetFeaturizer",
    "CrystalFeaturizer",
    "check_structure",
    "cif_validity",
    "parse_structure",
    "read_structure",
]

_EXTRA = "crystal"
#: Largest atomic number :class:`CGCNNEncoder` embeds.
MAX_ATOMIC_NUMBER = 118
#: CHGNet's element embedding covers H..Pu.
CHGNET_MAX_ATOMIC_NUMBER = 94
#: Bundled CHGNet checkpoints, relative to ``chgnet/pretrained`` (as in ``CHGNet.load``).
_CHGNET_CHECKPOINTS = {
    "0.3.0": "0.3.0/chgnet_0.3.0_e29f68s314m37.pth.tar",
    "0.2.0": "0.2.0/chgnet_0.2.0_e30f77s348m32.pth.tar",
    "r2scan": "r2scan/chgnet_r2scan_transfer_learning_e15f36s161m23.pth.tar",
}

_MAX_SHOWN = 80
_MAX_REASON = 300
_CIF_MARKERS = re.compile(r"^\s*(data_|_cell_length_|_atom_site_|loop_)", re.MULTILINE)
_FENCE = re.compile(r"^```[A-Za-z]*\s*$|^```\s*$", re.MULTILINE)


def _shown(value: object) -> str:
    """``repr`` of a value, truncated so a 10 kB CIF does not flood the message."""
    if isinstance(value, str) and len(value) > _MAX_SHOWN:
        return repr(value[:_MAX_SHOWN]) + f"... ({len(value)} characters)"
    text = repr(value)
    return text if len(text) <= _MAX_SHOWN else text[:_MAX_SHOWN] + "..."


def _reason(exc: BaseException, caught: Sequence[warnings.WarningMessage] = ()) -> str:
    """The exception's message plus the parser's warnings (pymatgen explains CIF problems there)."""
    parts = [str(exc) or type(exc).__name__]
    # pymatgen's closing "Issues encountered while parsing CIF" warning repeats the others.
    parts += [
        str(w.message).splitlines()[0]
        for w in caught
        if str(w.message).strip() and not str(w.message).startswith("Issues encountered")
    ]
    text = "; ".join(dict.fromkeys(p.strip() for p in parts if p.strip()))
    return text if len(text) <= _MAX_REASON else text[:_MAX_REASON] + "..."


# ---------------------------------------------------------------------------------- reading


def _looks_like_cif(text: str) -> bool:
    return _CIF_MARKERS.search(text) is not None


def _from_cif_text(text: str, *, record: str, source: str) -> Structure:
    cif = require("pymatgen.io.cif", extra=_EXTRA)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            structures = cif.CifParser.from_str(text).parse_structures(primitive=False, on_error="warn")
        except Exception as exc:  # pymatgen raises ValueError, KeyError, IndexError, ... here
            raise InvalidInputError(record, f"cannot read {source} as CIF: {_reason(exc, caught)}") from exc
    if not structures:
        raise InvalidInputError(record, f"{source} holds no structure")
    if len(structures) > 1:
        raise InvalidInputError(
            record, f"{source} holds {len(structures)} structures (data blocks); give one per record"
        )
    return cast("Structure", structures[0])


def _from_poscar_text(text: str, *, record: str, source: str) -> Structure:
    vasp = require("pymatgen.io.vasp", extra=_EXTRA)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            return cast("Structure", vasp.Poscar.from_str(text).structure)
        except Exception as exc:  # malformed POSCARs fail with many exception types
            raise InvalidInputError(
                record, f"cannot read {source} as CIF or POSCAR: {_reason(exc, caught)}"
            ) from exc


def _from_text(text: str, *, record: str, source: str) -> Structure:
    if _looks_like_cif(text):
        return _from_cif_text(text, record=record, source=source)
    return _from_poscar_text(text, record=record, source=source)


def _from_file(path: Path, *, record: str) -> Structure:
    core = require("pymatgen.core", extra=_EXTRA)
    source = f"file {str(path)!r}"
    name = path.name.lower()
    if name.endswith((".cif", ".mcif")) or "poscar" in name or "contcar" in name or name.endswith(".vasp"):
        try:
            text = path.read_text()
        except (OSError, UnicodeDecodeError) as exc:
            raise InvalidInputError(record, f"cannot read {source}: {exc}") from exc
        if not text.strip():
            raise InvalidInputError(record, f"{source} is empty")
        return _from_text(text, record=record, source=source)
    # Other formats pymatgen knows by name (.json, vasprun.xml, .xsf, .cssr, compressed CIFs, ...).
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            return cast("Structure", core.Structure.from_file(str(path)))
        except Exception as exc:  # the format-specific readers raise many exception types
            raise InvalidInputError(record, f"cannot read {source}: {_reason(exc, caught)}") from exc


def read_structure(value: Any, *, record: str) -> Structure:
    r"""Turn any accepted crystal input into a pymatgen ``Structure`` (no validity checks).

    Args:
        value: a ``Structure`` (returned as is); a ``dict`` from ``Structure.as_dict()``; CIF
            text; POSCAR text; or a path (``str`` or ``os.PathLike``) to a CIF, POSCAR or any
            file ``Structure.from_file`` reads. A one-line string is taken as a path.
        record (str): identifier of the record, used in error messages.

    Returns:
        pymatgen.core.Structure: the structure, in the cell as given (CIFs are not reduced
        to a primitive cell).

    Raises:
        InvalidInputError: ``value`` is ``None``, of an unsupported type (e.g. a ``Molecule``),
            an empty string, a path to no file, or text/a file/a dict pymatgen cannot read
            (the message carries pymatgen's reason); a CIF with several data blocks.
    """
    core = require("pymatgen.core", extra=_EXTRA)
    if isinstance(value, core.Structure):
        return value
    if value is None:
        raise InvalidInputError(record, "no structure given (the value is None)")
    if isinstance(value, core.Molecule):
        raise InvalidInputError(
            record, "got a pymatgen Molecule, which has no lattice; crystals need a periodic Structure"
        )
    if isinstance(value, Mapping):
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            try:
                return cast("Structure", core.Structure.from_dict(dict(value)))
            except Exception as exc:  # from_dict fails with KeyError, TypeError, ValueError, ...
                raise InvalidInputError(
                    record, f"cannot read the dict as a pymatgen Structure: {_reason(exc, caught)}"
                ) from exc
    if isinstance(value, os.PathLike):
        path = Path(value).expanduser()
        if not path.is_file():
            raise InvalidInputError(record, f"no such file: {str(path)!r}")
        return _from_file(path, record=record)
    if not isinstance(value, str):
        raise InvalidInputError(
            record,
            "expected a pymatgen Structure, a Structure dict, CIF or POSCAR text, or a file path; "
            f"got {type(value).__name__} {_shown(value)}",
        )
    text = value.strip()
    if not text:
        raise InvalidInputError(record, f"the structure text is empty ({_shown(value)})")
    if "\n" in text:
        return _from_text(text, record=record, source="the text")
    path = Path(text).expanduser()
    if not path.is_file():
        raise InvalidInputError(
            record,
            f"{_shown(value)} is not an existing file, and one line of text cannot be CIF or POSCAR",
        )
    return _from_file(path, record=record)


def check_structure(structure: Structure, *, record: str, min_distance: float = 0.5) -> None:
    """Raise :class:`InvalidInputError` unless ``structure`` is usable as a crystal graph.

    Args:
        structure: the structure to check.
        record: identifier of the record, used in error messages.
        min_distance: smallest allowed distance in Å between two atoms, periodic images
            included. (default: ``0.5``)

    Raises:
        InvalidInputError: the structure has no atoms; non-finite coordinates or a degenerate
            lattice; partially occupied (disordered) sites; dummy species; or two atoms closer
            than ``min_distance`` (the message names both sites and their distance).
    """
    import numpy as np

    core = require("pymatgen.core", extra=_EXTRA)
    if len(structure) == 0:
        raise InvalidInputError(record, "the structure has no atoms")
    matrix = np.asarray(structure.lattice.matrix, dtype=float)
    if not (np.isfinite(matrix).all() and np.isfinite(structure.frac_coords).all()):
        raise InvalidInputError(record, "the lattice or the coordinates hold NaN or infinite values")
    if not structure.lattice.volume > 1e-6:
        volume = structure.lattice.volume
        raise InvalidInputError(record, f"the lattice is degenerate (volume {volume:.3g} Å^3)")
    if not structure.is_ordered:
        disordered = [f"site {i} ({site.species})" for i, site in enumerate(structure) if not site.is_ordered]
        more = f" and {len(disordered) - 3} more" if len(disordered) > 3 else ""
        shown = ", ".join(disordered[:3]) + more
        raise InvalidInputError(
            record,
            f"partial occupancies (disordered sites) are not supported: {shown}; give an ordered "
            "cell (e.g. pymatgen's OrderDisorderedStructureTransformation)",
        )
    dummies = sorted({str(s) for s in structure.species if isinstance(s, core.DummySpecies)})
    if dummies:
        raise InvalidInputError(record, f"the structure holds dummy species {dummies}, not elements")
    centers, neighbors, _, distances = structure.get_neighbor_list(r=min_distance)
    if len(distances):
        k = int(np.argmin(distances))
        i, j = int(centers[k]), int(neighbors[k])
        which = (
            f"site {i} ({structure[i].specie}) and its periodic image"
            if i == j
            else (f"sites {i} ({structure[i].specie}) and {j} ({structure[j].specie})")
        )
        raise InvalidInputError(
            record,
            f"atoms overlap: {which} are {float(distances[k]):.3f} Å apart, below "
            f"min_distance={min_distance} Å",
        )


def parse_structure(value: Any, *, record: str, min_distance: float = 0.5) -> Structure:
    """:func:`read_structure` followed by :func:`check_structure`; see both for the errors."""
    structure = read_structure(value, record=record)
    check_structure(structure, record=record, min_distance=min_distance)
    return structure


# ---------------------------------------------------------------------------------- CGCNN


class CrystalFeaturizer:
    r"""Turn a crystal into a PyG radius graph over periodic images.

    Every atom :math:`i` of the cell is a node; an edge :math:`j \to i` joins it to each atom
    :math:`j` (periodic images included, so one pair may give several edges) within ``cutoff``,
    found with ``Structure.get_neighbor_list``. Only the ``max_neighbors`` nearest neighbours of
    each atom are kept (ties broken by neighbour index), so the graph need not be symmetric.
    Distances are expanded in ``num_gaussians`` Gaussians
    :math:`\exp(-(d - \mu_k)^2 / \sigma^2)` with centres :math:`\mu_k` evenly spaced on
    :math:`[0, \text{cutoff}]` and width :math:`\sigma` (default: their spacing).

    The featurizer holds only plain settings, so it pickles into DataLoader workers.

    Args:
        cutoff (float, optional): neighbour radius in Å. (default: :obj:`5.0`)
        max_neighbors (int, optional): neighbours kept per atom, nearest first.
            (default: :obj:`12`)
        num_gaussians (int, optional): size of the distance expansion; must equal the
            encoder's ``num_gaussians``. (default: :obj:`40`)
        gaussian_width (float, optional): :math:`\sigma` in Å. (default: the centre spacing)
        edge_vectors (bool, optional): also store ``edge_vec``, the vector from atom :math:`i`
            to neighbour :math:`j` in Å. (default: :obj:`False`)
        min_distance (float, optional): atoms closer than this (Å) are an error, see
            :func:`check_structure`. (default: :obj:`0.5`)
    """

    def __init__(
        self,
        *,
        cutoff: float = 5.0,
        max_neighbors: int = 12,
        num_gaussians: int = 40,
        gaussian_width: float | None = None,
        edge_vectors: bool = False,
        min_distance: float = 0.5,
    ) -> None:
        if not (math.isfinite(cutoff) and cutoff > 0):
            raise ValueError(f"cutoff must be a positive number of Å, got {cutoff}")
        if max_neighbors < 1:
            raise ValueError(f"max_neighbors must be >= 1, got {max_neighbors}")
        if num_gaussians < 2:
            raise ValueError(f"num_gaussians must be >= 2, got {num_gaussians}")
        if gaussian_width is not None and not gaussian_width > 0:
            raise ValueError(f"gaussian_width must be positive, got {gaussian_width}")
        if not 0 <= min_distance < cutoff:
            raise ValueError(f"min_distance must lie in [0, cutoff={cutoff}), got {min_distance}")
        self.cutoff = float(cutoff)
        self.max_neighbors = int(max_neighbors)
        self.num_gaussians = int(num_gaussians)
        self.gaussian_width = None if gaussian_width is None else float(gaussian_width)
        self.edge_vectors = bool(edge_vectors)
        self.min_distance = float(min_distance)

    def config(self) -> dict[str, Any]:
        """The featurizer's settings as plain data (for configs and cache keys)."""
        return {
            "cutoff": self.cutoff,
            "max_neighbors": self.max_neighbors,
            "num_gaussians": self.num_gaussians,
            "gaussian_width": self.gaussian_width,
            "edge_vectors": self.edge_vectors,
            "min_distance": self.min_distance,
        }

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v}" for k, v in self.config().items())
        return f"{type(self).__name__}({args})"

    def __call__(self, value: Any, *, record: str) -> Data:
        r"""Featurize one crystal.

        Args:
            value: anything :func:`read_structure` accepts (``Structure``, dict, CIF/POSCAR
                text, a file path).
            record (str): identifier of the record, used in error messages.

        Returns:
            torch_geometric.data.Data: ``z`` :math:`[N]` (long, atomic numbers), ``edge_index``
            :math:`[2, E]` (long; row 0 the neighbour :math:`j`, row 1 the centre :math:`i`),
            ``edge_dist`` :math:`[E]` (Å), ``edge_attr`` :math:`[E, \text{num\_gaussians}]`,
            ``edge_vec`` :math:`[E, 3]` (only with ``edge_vectors``) and ``num_nodes`` :math:`N`.

        Raises:
            InvalidInputError: see :func:`parse_structure`.
        """
        structure = parse_structure(value, record=record, min_distance=self.min_distance)
        return self.graph(structure)

    def graph(self, structure: Structure) -> Data:
        """The radius graph of an already checked structure (see :meth:`__call__`)."""
        import numpy as np

        data_mod = require("torch_geometric.data", extra=_EXTRA)
        n = len(structure)
        centers, neighbors, images, distances = structure.get_neighbor_list(r=self.cutoff)
        # Sort by centre, then distance (rounded, so float noise does not reorder ties), then
        # neighbour index; keep the first max_neighbors of each centre.
        order = np.lexsort((neighbors, np.round(distances, 6), centers))
        centers, neighbors, images, distances = (a[order] for a in (centers, neighbors, images, distances))
        counts = np.bincount(centers, minlength=n)
        starts = np.cumsum(counts) - counts
        keep = (np.arange(len(centers)) - starts[centers]) < self.max_neighbors
        centers, neighbors, images, distances = (a[keep] for a in (centers, neighbors, images, distances))

        dist = torch.as_tensor(distances, dtype=torch.float32)
        # The expansion in numpy: a small torch op here spins up intra-op threads, which made
        # it ~100x slower than np.exp per structure (benchmarks/README.md).
        mu = np.linspace(0.0, self.cutoff, self.num_gaussians, dtype=np.float32)
        width = self.gaussian_width or self.cutoff / (self.num_gaussians - 1)
        gauss = np.exp(-(((distances.astype(np.float32)[:, None] - mu) / np.float32(width)) ** 2))
        edge_attr = torch.from_numpy(np.ascontiguousarray(gauss, dtype=np.float32))
        edge_index = torch.as_tensor(np.stack([neighbors, centers]), dtype=torch.long).view(2, -1)
        data = data_mod.Data(
            z=torch.tensor([site.specie.Z for site in structure], dtype=torch.long),
            edge_index=edge_index,
            edge_dist=dist,
            edge_attr=edge_attr,
            num_nodes=n,
        )
        if self.edge_vectors:
            cart = structure.cart_coords
            vec = cart[neighbors] + images @ structure.lattice.matrix - cart[centers]
            data.edge_vec = torch.as_tensor(vec, dtype=torch.float32).view(-1, 3)
        return data


class _CGCNNLayer(nn.Module):
    r"""``Dropout(Softplus(LN(h_i + sum_j sigmoid(z_ij W_f) * softplus(z_ij W_s))))``.

    ``z_ij = [h_i, h_j, e_ij]``; PyG's ``CGConv`` computes the sum and adds ``h_i``.
    """

    def __init__(self, dim: int, edge_dim: int, dropout: float) -> None:
        super().__init__()
        pyg_nn = require("torch_geometric.nn", extra=_EXTRA)
        self.conv = pyg_nn.CGConv(dim, dim=edge_dim, aggr="add", batch_norm=False)
        self.norm = nn.LayerNorm(dim)
        self.dropout = nn.Dropout(dropout)

    def reset_parameters(self) -> None:
        self.conv.reset_parameters()
        self.norm.reset_parameters()

    def forward(self, h: Tensor, edge_index: Tensor, edge_attr: Tensor) -> Tensor:
        out = nn.functional.softplus(self.norm(self.conv(h, edge_index, edge_attr)))
        return cast(Tensor, self.dropout(out))


class CGCNNEncoder(GraphItems, nn.Module):
    r"""Crystal graph convolutional network (Xie & Grossman, 2018) over periodic radius graphs.

    Atoms are embedded by atomic number; each of the :math:`L` layers applies the gated
    convolution

    .. math::
        \mathbf{h}_i^{(l+1)} = \mathrm{Softplus}\Big(\mathrm{LN}\Big(\mathbf{h}_i^{(l)} +
        \sum_{j \in \mathcal{N}(i)} \sigma\big(\mathbf{z}_{ij}\mathbf{W}_f + \mathbf{b}_f\big)
        \odot \mathrm{Softplus}\big(\mathbf{z}_{ij}\mathbf{W}_s + \mathbf{b}_s\big)\Big)\Big),
        \qquad \mathbf{z}_{ij} = \mathbf{h}_i \,\Vert\, \mathbf{h}_j \,\Vert\, \mathbf{e}_{ij}

    with :math:`\mathbf{e}_{ij}` the Gaussian-expanded distance (LayerNorm where CGCNN has
    BatchNorm, so a batch of one crystal is well defined). A final LayerNorm (and, with
    ``out_dim``, a linear map) follows. Every atom of the cell becomes one token.

    Args:
        hidden_dim (int, optional): width :math:`D` of atom states. (default: :obj:`128`)
        num_layers (int, optional): number of convolutions :math:`L`. (default: :obj:`3`)
        num_gaussians (int, optional): width of ``edge_attr``; must equal the featurizer's.
            (default: :obj:`40`)
        out_dim (int, optional): width of the output tokens. (default: ``hidden_dim``)
        dropout (float, optional): dropout probability after each layer. (default: :obj:`0.0`)

    Shapes:
        - **input:** a :class:`torch_geometric.data.Batch` of :math:`B` graphs from
          :class:`CrystalFeaturizer`: ``z`` :math:`[\sum N_b]`, ``edge_index``
          :math:`[2, \sum E_b]`, ``edge_attr`` :math:`[\sum E_b, \text{num\_gaussians}]`,
          ``batch`` :math:`[\sum N_b]`
        - **output:** tokens :math:`(B, N_{max}, \text{out\_dim})` (zeros at padding) and a bool
          mask :math:`(B, N_{max})`, :obj:`True` for a real atom
    """

    modality = "crystal"
    item_name = "crystal"
    extra = _EXTRA

    def __init__(
        self,
        *,
        hidden_dim: int = 128,
        num_layers: int = 3,
        num_gaussians: int = 40,
        out_dim: int | None = None,
        dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if hidden_dim < 1:
            raise ValueError(f"hidden_dim must be >= 1, got {hidden_dim}")
        if num_layers < 1:
            raise ValueError(f"num_layers must be >= 1, got {num_layers}")
        if num_gaussians < 2:
            raise ValueError(f"num_gaussians must be >= 2, got {num_gaussians}")
        if out_dim is not None and out_dim < 1:
            raise ValueError(f"out_dim must be >= 1, got {out_dim}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        self.hidden_dim = hidden_dim
        self.num_layers = num_layers
        self.num_gaussians = num_gaussians
        self.out_dim: int = out_dim or hidden_dim

        self.atom_embedding = nn.Embedding(MAX_ATOMIC_NUMBER + 1, hidden_dim)
        self.layers = nn.ModuleList(
            _CGCNNLayer(hidden_dim, num_gaussians, dropout) for _ in range(num_layers)
        )
        self.final_norm = nn.LayerNorm(hidden_dim)
        self.out_proj: nn.Module = nn.Linear(hidden_dim, out_dim) if out_dim is not None else nn.Identity()
        self.reset_parameters()

    def reset_parameters(self) -> None:
        r"""Resets all learnable parameters of the module."""
        self.atom_embedding.reset_parameters()
        for layer in self.layers:
            cast(_CGCNNLayer, layer).reset_parameters()
        self.final_norm.reset_parameters()
        if isinstance(self.out_proj, nn.Linear):
            self.out_proj.reset_parameters()

    def forward(self, batch: Batch) -> tuple[Tensor, Tensor]:
        r"""Encode a batch of crystal graphs into per-atom tokens.

        Args:
            batch (torch_geometric.data.Batch): graphs from :meth:`collate`.

        Returns:
            (torch.Tensor, torch.Tensor): tokens :math:`(B, N_{max}, \text{out\_dim})` and the bool
            mask :math:`(B, N_{max})` (:obj:`True` = real atom).

        Raises:
            ValueError: the graphs' ``edge_attr`` width differs from ``num_gaussians``.
        """
        to_dense_batch = require("torch_geometric.utils", extra=_EXTRA).to_dense_batch
        if batch.edge_attr.shape[-1] != self.num_gaussians:
            raise ValueError(
                f"the graphs have {batch.edge_attr.shape[-1]} Gaussian distance features but the "
                f"encoder expects num_gaussians={self.num_gaussians}; give the featurizer and the "
                "encoder the same num_gaussians"
            )
        h = self.atom_embedding(batch.z)
        for layer in self.layers:
            h = layer(h, batch.edge_index, batch.edge_attr)
        h = self.out_proj(self.final_norm(h))
        tokens, mask = to_dense_batch(h, batch.batch, batch_size=batch.num_graphs)
        return tokens, mask

    def extra_repr(self) -> str:
        return f"hidden_dim={self.hidden_dim}, num_layers={self.num_layers}, out_dim={self.out_dim}"


# ---------------------------------------------------------------------------------- CHGNet


class CHGNetFeaturizer:
    r"""Turn a crystal into CHGNet's ``CrystalGraph`` (atom graph + bond graph for angles).

    The structure is checked as for every crystal (:func:`parse_structure`), then converted by
    CHGNet's own ``CrystalGraphConverter``. The cutoffs must match the CHGNet checkpoint
    (6 Å and 3 Å for all bundled ones); :class:`CHGNetEncoder` checks this.

    The featurizer holds only plain settings (the converter is rebuilt on first use in each
    process), so it pickles into DataLoader workers.

    Args:
        atom_graph_cutoff (float, optional): neighbour radius of the atom graph in Å.
            (default: :obj:`6.0`)
        bond_graph_cutoff (float, optional): bonds shorter than this (Å) form angles.
            (default: :obj:`3.0`)
        min_distance (float, optional): atoms closer than this (Å) are an error.
            (default: :obj:`0.5`)
    """

    def __init__(
        self, *, atom_graph_cutoff: float = 6.0, bond_graph_cutoff: float = 3.0, min_distance: float = 0.5
    ) -> None:
        if not 0 < bond_graph_cutoff <= atom_graph_cutoff:
            raise ValueError(
                "need 0 < bond_graph_cutoff <= atom_graph_cutoff, got "
                f"{bond_graph_cutoff} and {atom_graph_cutoff}"
            )
        if not 0 <= min_distance < bond_graph_cutoff:
            raise ValueError(f"min_distance must lie in [0, {bond_graph_cutoff}), got {min_distance}")
        self.atom_graph_cutoff = float(atom_graph_cutoff)
        self.bond_graph_cutoff = float(bond_graph_cutoff)
        self.min_distance = float(min_distance)
        self._converter: Any = None

    def config(self) -> dict[str, Any]:
        """The featurizer's settings as plain data (for configs and cache keys)."""
        return {
            "atom_graph_cutoff": self.atom_graph_cutoff,
            "bond_graph_cutoff": self.bond_graph_cutoff,
            "min_distance": self.min_distance,
        }

    def __repr__(self) -> str:
        args = ", ".join(f"{k}={v}" for k, v in self.config().items())
        return f"{type(self).__name__}({args})"

    def __getstate__(self) -> dict[str, Any]:
        return {**self.__dict__, "_converter": None}

    def __call__(self, value: Any, *, record: str) -> Any:
        r"""Featurize one crystal.

        Args:
            value: anything :func:`read_structure` accepts.
            record (str): identifier of the record, used in error messages.

        Returns:
            chgnet.graph.CrystalGraph: ``atomic_number`` :math:`[N]`, ``atom_frac_coord``
            :math:`[N, 3]`, ``lattice`` :math:`[3, 3]`, the atom graph, the bond graph and the
            periodic images of each edge (no tensor requires grad).

        Raises:
            InvalidInputError: see :func:`parse_structure`; an element heavier than Pu
                (CHGNet knows :math:`Z \le 94`); an atom with no neighbour within
                ``atom_graph_cutoff``.
        """
        structure = parse_structure(value, record=record, min_distance=self.min_distance)
        heavy = sorted({str(el) for el in structure.composition.elements if el.Z > CHGNET_MAX_ATOMIC_NUMBER})
        if heavy:
            raise InvalidInputError(
                record, f"CHGNet knows elements up to Pu (Z <= {CHGNET_MAX_ATOMIC_NUMBER}); got {heavy}"
            )
        if self._converter is None:
            converter_mod = require("chgnet.graph.converter", extra=_EXTRA)
            self._converter = converter_mod.CrystalGraphConverter(
                atom_graph_cutoff=self.atom_graph_cutoff,
                bond_graph_cutoff=self.bond_graph_cutoff,
                on_isolated_atoms="error",
            )
        try:
            graph = self._converter(structure, graph_id=record)
        except (ValueError, RuntimeError) as exc:
            raise InvalidInputError(record, f"CHGNet cannot build its graph: {exc}") from exc
        # The converter makes coordinates and lattice leaves that require grad (for forces and
        # stress); scifm reads only features, so keep the graph plain data.
        graph.atom_frac_coord = graph.atom_frac_coord.detach()
        graph.lattice = graph.lattice.detach()
        return graph


class CHGNetBatch:
    """A batch of CHGNet ``CrystalGraph``\\ s; ``to(device)`` moves every graph."""

    def __init__(self, graphs: Sequence[Any]) -> None:
        self.graphs = list(graphs)

    @property
    def num_graphs(self) -> int:
        return len(self.graphs)

    def to(self, device: str | torch.device) -> CHGNetBatch:
        return CHGNetBatch([g.to(str(device)) for g in self.graphs])

    def __repr__(self) -> str:
        return f"CHGNetBatch(num_graphs={self.num_graphs})"


def _load_chgnet(model_name: str) -> nn.Module:
    """A bundled CHGNet checkpoint, read with ``torch.load(weights_only=True)`` (no pickle code)."""
    chgnet_pkg = require("chgnet", extra=_EXTRA)
    model_mod = require("chgnet.model.model", extra=_EXTRA)
    if model_name not in _CHGNET_CHECKPOINTS:
        raise ValueError(f"unknown CHGNet model_name {model_name!r}; valid: {sorted(_CHGNET_CHECKPOINTS)}")
    path = Path(str(chgnet_pkg.__file__)).parent / "pretrained" / _CHGNET_CHECKPOINTS[model_name]
    if not path.is_file():
        raise FileNotFoundError(f"the installed chgnet has no {model_name!r} checkpoint at {path}")
    state = torch.load(path, map_location="cpu", weights_only=True)
    with contextlib.redirect_stdout(io.StringIO()):  # CHGNet prints a banner on construction
        model = model_mod.CHGNet.from_dict(
            state["model"], mlp_out_bias=model_name == "0.2.0", version=model_name
        )
    return cast(nn.Module, model)


class CHGNetEncoder(nn.Module):
    r"""The pretrained CHGNet (Deng et al., 2023) with its per-atom features as tokens.

    The bundled checkpoint (trained on the Materials Project trajectories) is loaded offline.
    Freeze it with ``EncoderConfig.trainable: false`` or fine-tune it with the rest. The
    tokens are the atom features after the last atom convolution (and CHGNet's readout norm),
    i.e. what its energy head reads, or (``layer="penultimate"``) those before it, from which
    CHGNet predicts magnetic moments (its "charge-informed" features).

    Args:
        model_name (str, optional): ``"0.3.0"``, ``"0.2.0"`` or ``"r2scan"``.
            (default: :obj:`"0.3.0"`)
        layer (str, optional): ``"last"`` or ``"penultimate"``. (default: :obj:`"last"`)
        pretrained (bool, optional): load the checkpoint's weights; :obj:`False` builds the
            same architecture with random weights. (default: :obj:`True`)

    Shapes:
        - **input:** a :class:`CHGNetBatch` of :math:`B` graphs from :class:`CHGNetFeaturizer`
        - **output:** tokens :math:`(B, N_{max}, 64)` (zeros at padding; ``out_dim`` is the
          checkpoint's atom feature width) and a bool mask :math:`(B, N_{max})`
    """

    modality = "crystal"

    def __init__(
        self,
        *,
        model_name: str = "0.3.0",
        layer: Literal["last", "penultimate"] = "last",
        pretrained: bool = True,
    ) -> None:
        super().__init__()
        if layer not in ("last", "penultimate"):
            raise ValueError(f"layer must be 'last' or 'penultimate', got {layer!r}")
        if pretrained:
            self.model = _load_chgnet(model_name)
        else:
            model_mod = require("chgnet.model.model", extra=_EXTRA)
            with contextlib.redirect_stdout(io.StringIO()):
                self.model = model_mod.CHGNet()
        self.model_name = model_name
        self.layer = layer
        self.out_dim: int = int(cast(Any, self.model).atom_fea_dim)

    def forward(self, batch: CHGNetBatch) -> tuple[Tensor, Tensor]:
        r"""Encode a batch of CHGNet graphs into per-atom tokens.

        Returns:
            (torch.Tensor, torch.Tensor): tokens :math:`(B, N_{max}, \text{out\_dim})` and the bool
            mask :math:`(B, N_{max})` (:obj:`True` = real atom).

        Raises:
            ValueError: the graphs were built with cutoffs other than the checkpoint's.
        """
        model_mod = require("chgnet.model.model", extra=_EXTRA)
        chgnet = cast(Any, self.model)
        converter = chgnet.graph_converter
        for g in batch.graphs:
            expected = (converter.atom_graph_cutoff, converter.bond_graph_cutoff)
            if (g.atom_graph_cutoff, g.bond_graph_cutoff) != expected:
                raise ValueError(
                    f"graph {g.graph_id!r} was built with cutoffs ({g.atom_graph_cutoff}, "
                    f"{g.bond_graph_cutoff}) Å but this CHGNet expects ({converter.atom_graph_cutoff}, "
                    f"{converter.bond_graph_cutoff}) Å; set the featurizer's atom_graph_cutoff and "
                    "bond_graph_cutoff to match"
                )
        graphs = model_mod.BatchedGraph.from_graphs(
            batch.graphs,
            bond_basis_expansion=chgnet.bond_basis_expansion,
            angle_basis_expansion=chgnet.angle_basis_expansion,
            compute_stress=False,
        )
        captured: list[Tensor] = []
        handle = None
        if self.layer == "last":
            handle = chgnet.atom_conv_layers[-1].register_forward_hook(
                lambda _module, _inputs, output: captured.append(output)
            )
        try:
            out = chgnet._compute(graphs, return_atom_feas=self.layer == "penultimate")
        finally:
            if handle is not None:
                handle.remove()
        if self.layer == "last":
            feats = captured[0]
            if chgnet.readout_norm is not None:
                feats = chgnet.readout_norm(feats)
        else:
            feats = torch.cat(out["atom_fea"])
        counts = [int(g.atomic_number.shape[0]) for g in batch.graphs]
        tokens = nn.utils.rnn.pad_sequence(list(torch.split(feats, counts)), batch_first=True)
        lengths = torch.tensor(counts, device=tokens.device)
        mask = torch.arange(tokens.shape[1], device=tokens.device) < lengths.unsqueeze(1)
        return tokens, mask

    @staticmethod
    def item_tokens(item: Any) -> int:
        """Number of tokens one featurized crystal yields: the atoms of its cell."""
        return int(item.atomic_number.shape[0])

    @staticmethod
    def collate(items: list[Any]) -> CHGNetBatch:
        """Batch CHGNet graphs (from :class:`CHGNetFeaturizer`) for :meth:`forward`.

        Raises:
            ValueError: ``items`` is empty.
        """
        if not items:
            raise ValueError("collate needs at least one crystal, got an empty list")
        return CHGNetBatch(items)

    def extra_repr(self) -> str:
        return f"model_name={self.model_name!r}, layer={self.layer!r}, out_dim={self.out_dim}"


# ---------------------------------------------------------------------------------- generation


def _strip_fences(text: str) -> str:
    """Generated CIFs often come in Markdown code fences; drop the fence lines."""
    return _FENCE.sub("", text).strip()


def _charge_balanced(composition: Any) -> bool:
    """A charge-neutral assignment of common oxidation states exists, or every element is a
    metal (alloys and intermetallics, where charge balance does not apply; CDVAE's convention)."""
    if all(el.is_metal for el in composition.elements):
        return True
    try:
        return len(composition.oxi_state_guesses(max_sites=-1)) > 0
    except Exception:  # oxi_state_guesses fails on fractional or exotic compositions
        return False


def cif_validity(
    texts: Sequence[str],
    *,
    expected_formulas: Sequence[str | None] | None = None,
    min_distance: float = 0.5,
) -> dict[str, Any]:
    """Rate how much of a batch of generated CIF text is a usable crystal.

    Each text (Markdown code fences are dropped) is checked for:

    - ``parse``: pymatgen reads exactly one structure with at least one atom from it;
    - ``composition``: its reduced composition equals ``expected_formulas[i]`` (only for texts
      with an expected formula);
    - ``distance``: no two atoms (periodic images included) closer than ``min_distance`` Å;
    - ``charge_balance``: a charge-neutral assignment of common oxidation states exists
      (``Composition.oxi_state_guesses``), or all elements are metals (alloys count as balanced);
    - ``valid``: all of the above that apply.

    Args:
        texts: generated CIF texts.
        expected_formulas: the formula asked for, per text (``None`` for no request), e.g.
            ``"NaCl"``; compared as reduced compositions, so ``"Na4Cl4"`` matches. (default: none)
        min_distance: smallest allowed interatomic distance in Å. (default: ``0.5``)

    Returns:
        dict: ``n``; ``parse_rate``, ``distance_rate``, ``charge_balance_rate`` and
        ``valid_rate`` (fractions of all ``n`` texts; an unparsable text fails every check);
        ``composition_rate`` (fraction of the texts with an expected formula; ``None`` when
        there are none); and ``details``, one dict per text with ``parsed``, ``error``,
        ``formula``, ``composition_ok``, ``min_distance`` (the closest pair below the
        threshold, else ``None``), ``distance_ok``, ``charge_balanced`` and ``valid``.

    Raises:
        ValueError: ``texts`` is empty, or ``expected_formulas`` has another length.
    """
    import numpy as np

    core = require("pymatgen.core", extra=_EXTRA)
    texts = list(texts)
    if not texts:
        raise ValueError("cif_validity needs at least one text")
    expected = list(expected_formulas) if expected_formulas is not None else [None] * len(texts)
    if len(expected) != len(texts):
        raise ValueError(f"{len(texts)} texts but {len(expected)} expected_formulas")
    details: list[dict[str, Any]] = []
    for i, (text, formula) in enumerate(zip(texts, expected, strict=True)):
        row: dict[str, Any] = {
            "parsed": False,
            "error": None,
            "formula": None,
            "composition_ok": None,
            "min_distance": None,
            "distance_ok": False,
            "charge_balanced": False,
            "valid": False,
        }
        details.append(row)
        if formula is not None:
            row["composition_ok"] = False
        try:
            body = _strip_fences(text) if isinstance(text, str) else text
            if not isinstance(body, str) or not body:
                raise InvalidInputError(f"texts[{i}]", "the text is empty")
            structure = _from_cif_text(body, record=f"texts[{i}]", source="the text")
            if len(structure) == 0:
                raise InvalidInputError(f"texts[{i}]", "the structure has no atoms")
        except InvalidInputError as exc:
            row["error"] = exc.problem
            continue
        row["parsed"] = True
        composition = structure.composition
        row["formula"] = composition.reduced_formula
        if formula is not None:
            try:
                wanted = core.Composition(formula)
                reduced = composition.reduced_composition
                row["composition_ok"] = reduced.almost_equals(wanted.reduced_composition)
            except Exception:  # an unparsable expected formula never matches
                row["composition_ok"] = False
        _, _, _, distances = structure.get_neighbor_list(r=min_distance)
        row["min_distance"] = float(np.min(distances)) if len(distances) else None
        row["distance_ok"] = not len(distances)
        row["charge_balanced"] = _charge_balanced(composition)
        row["valid"] = bool(
            row["distance_ok"] and row["charge_balanced"] and row["composition_ok"] is not False
        )
    n = len(details)
    asked = [d for d in details if d["composition_ok"] is not None]
    return {
        "n": n,
        "parse_rate": sum(d["parsed"] for d in details) / n,
        "composition_rate": (sum(bool(d["composition_ok"]) for d in asked) / len(asked)) if asked else None,
        "distance_rate": sum(d["distance_ok"] for d in details) / n,
        "charge_balance_rate": sum(d["charge_balanced"] for d in details) / n,
        "valid_rate": sum(d["valid"] for d in details) / n,
        "details": details,
    }
