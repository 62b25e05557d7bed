"""Molecules: SMILES / RDKit ``Mol`` -> categorical atom/bond graph -> GINE node tokens.

Read top to bottom: the feature vocabularies, :func:`parse_molecule` (validation with RDKit's
own reason for a failure), :class:`MoleculeFeaturizer` (Mol -> PyG ``Data``) and
:class:`GINEEncoder` (``Batch`` -> ``(B, N_max, D)`` tokens and a mask, one token per atom).

RDKit and PyTorch Geometric are imported where they are used, so importing this module is cheap
and works without the ``molecule`` extra.
"""

from __future__ import annotations

import functools
import re
from collections.abc import Sequence
from typing import TYPE_CHECKING, Any, cast

import torch
from torch import Tensor, nn

from scifm._extras import require
from scifm.encoders._graph import GraphItems
from scifm.errors import InvalidInputError

if TYPE_CHECKING:
    from rdkit import Chem
    from torch_geometric.data import Batch, Data

__all__ = [
    "ATOM_FEATURE_DIMS",
    "BOND_FEATURE_DIMS",
    "GINEEncoder",
    "MoleculeFeaturizer",
    "parse_molecule",
]

_EXTRA = "molecule"
_OTHER = "other"

# Atom vocabularies. The last entry of each is the bucket for anything not listed, so an exotic
# atom still featurizes instead of failing. RDKit enums are matched by name (``.name``), which
# keeps these lists plain data and independent of the RDKit version's enum numbering.
ATOMIC_NUMBERS: list[int | str] = [*range(1, 119), _OTHER]
CHIRALITY_TAGS: list[str] = [
    "CHI_UNSPECIFIED",
    "CHI_TETRAHEDRAL_CW",
    "CHI_TETRAHEDRAL_CCW",
    "CHI_OTHER",
    "CHI_TETRAHEDRAL",
    "CHI_ALLENE",
    "CHI_SQUAREPLANAR",
    "CHI_TRIGONALBIPYRAMIDAL",
    "CHI_OCTAHEDRAL",
    _OTHER,
]
DEGREES: list[int | str] = [*range(0, 11), _OTHER]
FORMAL_CHARGES: list[int | str] = [*range(-5, 6), _OTHER]
NUM_HYDROGENS: list[int | str] = [*range(0, 9), _OTHER]
RADICAL_ELECTRONS: list[int | str] = [*range(0, 5), _OTHER]
HYBRIDIZATIONS: list[str] = ["S", "SP", "SP2", "SP3", "SP3D", "SP3D2", _OTHER]
IS_AROMATIC: list[bool] = [False, True]
IS_IN_RING: list[bool] = [False, True]

# Bond vocabularies.
BOND_TYPES: list[str] = ["SINGLE", "DOUBLE", "TRIPLE", "AROMATIC", _OTHER]
BOND_STEREO: list[str] = [
    "STEREONONE",
    "STEREOZ",
    "STEREOE",
    "STEREOCIS",
    "STEREOTRANS",
    "STEREOANY",
    _OTHER,
]
IS_CONJUGATED: list[bool] = [False, True]

ATOM_FEATURE_DIMS: tuple[int, ...] = tuple(
    len(v)
    for v in (
        ATOMIC_NUMBERS,
        CHIRALITY_TAGS,
        DEGREES,
        FORMAL_CHARGES,
        NUM_HYDROGENS,
        RADICAL_ELECTRONS,
        HYBRIDIZATIONS,
        IS_AROMATIC,
        IS_IN_RING,
    )
)
"""Number of categories of each column of ``Data.x``, in column order."""

BOND_FEATURE_DIMS: tuple[int, ...] = tuple(len(v) for v in (BOND_TYPES, BOND_STEREO, IS_CONJUGATED))
"""Number of categories of each column of ``Data.edge_attr``, in column order."""


def _index(vocabulary: Sequence[Any]) -> dict[Any, int]:
    return {value: i for i, value in enumerate(vocabulary) if value != _OTHER}


_DEGREE_INDEX = _index(DEGREES)
_CHARGE_INDEX = _index(FORMAL_CHARGES)
_NUM_HS_INDEX = _index(NUM_HYDROGENS)
_RADICAL_INDEX = _index(RADICAL_ELECTRONS)


@functools.cache
def _enum_indices() -> tuple[dict[Any, int], ...]:
    """Lookup tables keyed by RDKit enum values (chirality, hybridization, bond type, stereo).

    Built on first use (RDKit is not imported at module import). Names this RDKit version lacks
    are skipped: they can never occur.
    """
    Chem = require("rdkit.Chem", extra=_EXTRA)

    def table(enum: Any, vocabulary: Sequence[Any]) -> dict[Any, int]:
        return {
            getattr(enum, name): i
            for i, name in enumerate(vocabulary)
            if name != _OTHER and hasattr(enum, name)
        }

    return (
        table(Chem.ChiralType, CHIRALITY_TAGS),
        table(Chem.HybridizationType, HYBRIDIZATIONS),
        table(Chem.BondType, BOND_TYPES),
        table(Chem.BondStereo, BOND_STEREO),
    )


_MAX_SHOWN = 80
_MAX_REASON = 240
_LOG_TIMESTAMP = re.compile(r"^\[\d\d:\d\d:\d\d\] ")


def _shown(value: object) -> str:
    """``repr`` of a value, truncated so a 10 kB string does not flood the message."""
    if isinstance(value, str) and len(value) > _MAX_SHOWN:
        return repr(value[:_MAX_SHOWN]) + f"... ({len(value)} characters)"
    text = repr(value)
    return text if len(text) <= _MAX_SHOWN else text[:_MAX_SHOWN] + "..."


def _rdkit_reason(Chem: Any, rdBase: Any, smiles: str) -> str:
    """Why RDKit rejects ``smiles``: the chemistry problems, or the parser's own message."""
    mol = Chem.MolFromSmiles(smiles, sanitize=False)
    if mol is not None:
        problems = [p.Message() for p in Chem.DetectChemistryProblems(mol)]
        if problems:
            return "; ".join(dict.fromkeys(problems))
        try:
            Chem.SanitizeMol(mol)
        except Exception as exc:  # RDKit raises several unrelated exception types here
            return str(exc) or type(exc).__name__
        return "RDKit could not sanitize it"
    # A syntax error: RDKit only logs the reason. CaptureErrorLog (RDKit >= 2025) hands it to us.
    capture_cls = getattr(rdBase, "CaptureErrorLog", None)
    if capture_cls is None:
        return "SMILES syntax error"
    with capture_cls() as capture:
        Chem.MolFromSmiles(smiles, sanitize=False)
    try:
        messages = capture.messages
    except UnicodeDecodeError:  # RDKit clips its echo of the input mid-character
        return "SMILES syntax error"
    prefix = "SMILES Parse Error: "
    lines = [_LOG_TIMESTAMP.sub("", line).strip() for line in messages.splitlines()]
    # Keep the parser's own lines (not the echoed input and its ``~~^`` marker), minus the
    # closing "Failed parsing SMILES ..." line, which repeats the input.
    reasons = [
        line.removeprefix(prefix).rstrip(":")
        for line in lines
        if line.startswith(prefix) and "Failed parsing SMILES" not in line
    ]
    return "; ".join(dict.fromkeys(reasons)) or "SMILES syntax error"


def parse_molecule(value: str | Chem.Mol, *, record: str) -> Chem.Mol:
    r"""Parse a SMILES string (or pass through an RDKit ``Mol``), failing loudly.

    Every fragment is kept: a salt such as ``"[Na+].[Cl-]"`` is one molecule with two
    fragments (see :class:`MoleculeFeaturizer` for keeping the largest only).

    Args:
        value (str or rdkit.Chem.Mol): a SMILES string (surrounding whitespace is ignored) or an
            already parsed molecule (returned as is).
        record (str): identifier of the record, used in the error message (e.g. ``"train.csv:12"``).

    Returns:
        rdkit.Chem.Mol: the sanitized molecule.

    Raises:
        InvalidInputError: ``value`` is ``None``, not a string or ``Mol``, empty, holds whitespace
            inside the SMILES (RDKit would silently drop the text after it), cannot be parsed or
            sanitized (the message carries RDKit's reason), or has no atoms.
    """
    Chem = require("rdkit.Chem", extra=_EXTRA)
    if isinstance(value, Chem.Mol):
        if value.GetNumAtoms() == 0:
            raise InvalidInputError(record, "the molecule has no atoms")
        return value
    if value is None:
        raise InvalidInputError(record, "no SMILES given (the value is None)")
    if not isinstance(value, str):
        raise InvalidInputError(
            record,
            f"expected a SMILES string or an RDKit Mol, got {type(value).__name__} {_shown(value)}",
        )
    smiles = value.strip()
    if not smiles:
        raise InvalidInputError(record, f"the SMILES is empty ({_shown(value)})")
    if any(ch.isspace() for ch in smiles):
        raise InvalidInputError(
            record,
            f"the SMILES {_shown(value)} contains whitespace; RDKit would read only the part before it",
        )
    rdBase = require("rdkit.rdBase", extra=_EXTRA)
    blocker = rdBase.BlockLogs()  # RDKit's own stderr logging; our exception carries the reason
    try:
        mol = Chem.MolFromSmiles(smiles)
        if mol is None:
            reason = _rdkit_reason(Chem, rdBase, smiles)
            if len(reason) > _MAX_REASON:  # RDKit's messages may echo the whole input
                reason = reason[:_MAX_REASON] + "..."
            raise InvalidInputError(record, f"RDKit cannot read SMILES {_shown(smiles)}: {reason}")
    finally:
        del blocker
    if mol.GetNumAtoms() == 0:
        raise InvalidInputError(record, f"the SMILES {_shown(smiles)} has no atoms")
    return mol


class MoleculeFeaturizer:
    r"""Turn a SMILES or RDKit ``Mol`` into a PyG graph of categorical atom and bond features.

    Atom columns of ``x`` (index into the vocabulary; unknown values go to the last, "other"
    bucket): atomic number, chirality tag, degree, formal charge, total number of hydrogens,
    radical electrons, hybridization, is aromatic, is in ring (sizes :data:`ATOM_FEATURE_DIMS`).
    Bond columns of ``edge_attr``: bond type, stereo, is conjugated (sizes
    :data:`BOND_FEATURE_DIMS`). Hydrogens are implicit (counted in the hydrogen column).

    The featurizer holds only plain settings, so it pickles into DataLoader workers.

    Args:
        largest_fragment (bool, optional): keep only the largest fragment (by heavy atoms,
            RDKit's ``LargestFragmentChooser``), e.g. drop the counter-ion of a salt.
            (default: :obj:`False`)
    """

    def __init__(self, *, largest_fragment: bool = False) -> None:
        self.largest_fragment = largest_fragment

    def config(self) -> dict[str, Any]:
        """The featurizer's settings as plain data (for configs and cache keys)."""
        return {"largest_fragment": self.largest_fragment}

    def __repr__(self) -> str:
        return f"{type(self).__name__}(largest_fragment={self.largest_fragment})"

    def __call__(self, value: str | Chem.Mol, *, record: str) -> Data:
        r"""Featurize one molecule.

        Args:
            value (str or rdkit.Chem.Mol): a SMILES string or a parsed molecule.
            record (str): identifier of the record, used in error messages.

        Returns:
            torch_geometric.data.Data: ``x`` :math:`[N, 9]` (long), ``edge_index`` :math:`[2, 2E]`
            (long, each bond in both directions), ``edge_attr`` :math:`[2E, 3]` (long) and
            ``num_nodes`` :math:`N \geq 1`.

        Raises:
            InvalidInputError: see :func:`parse_molecule`.
        """
        data_mod = require("torch_geometric.data", extra=_EXTRA)
        mol = parse_molecule(value, record=record)
        if self.largest_fragment:
            rdMolStandardize = require("rdkit.Chem.MolStandardize.rdMolStandardize", extra=_EXTRA)
            mol = rdMolStandardize.LargestFragmentChooser().choose(mol)

        chirality_index, hybridization_index, bond_type_index, stereo_index = _enum_indices()
        other_chirality, other_hybridization = len(CHIRALITY_TAGS) - 1, len(HYBRIDIZATIONS) - 1
        other_bond_type, other_stereo = len(BOND_TYPES) - 1, len(BOND_STEREO) - 1
        atoms = []
        for a in range(mol.GetNumAtoms()):
            atom = mol.GetAtomWithIdx(a)
            z = atom.GetAtomicNum()
            atoms.append(
                (
                    z - 1 if 1 <= z <= 118 else 118,
                    chirality_index.get(atom.GetChiralTag(), other_chirality),
                    _DEGREE_INDEX.get(atom.GetDegree(), len(DEGREES) - 1),
                    _CHARGE_INDEX.get(atom.GetFormalCharge(), len(FORMAL_CHARGES) - 1),
                    _NUM_HS_INDEX.get(atom.GetTotalNumHs(), len(NUM_HYDROGENS) - 1),
                    _RADICAL_INDEX.get(atom.GetNumRadicalElectrons(), len(RADICAL_ELECTRONS) - 1),
                    hybridization_index.get(atom.GetHybridization(), other_hybridization),
                    int(atom.GetIsAromatic()),
                    int(atom.IsInRing()),
                )
            )
        pairs: list[tuple[int, int]] = []
        bonds: list[tuple[int, int, int]] = []
        for b in range(mol.GetNumBonds()):
            bond = mol.GetBondWithIdx(b)
            i, j = bond.GetBeginAtomIdx(), bond.GetEndAtomIdx()
            feats = (
                bond_type_index.get(bond.GetBondType(), other_bond_type),
                stereo_index.get(bond.GetStereo(), other_stereo),
                int(bond.GetIsConjugated()),
            )
            pairs += [(i, j), (j, i)]
            bonds += [feats, feats]

        x = torch.tensor(atoms, dtype=torch.long).view(-1, len(ATOM_FEATURE_DIMS))
        edge_index = torch.tensor(pairs, dtype=torch.long).view(-1, 2).t().contiguous()
        edge_attr = torch.tensor(bonds, dtype=torch.long).view(-1, len(BOND_FEATURE_DIMS))
        return data_mod.Data(x=x, edge_index=edge_index, edge_attr=edge_attr, num_nodes=len(atoms))


class _CategoricalEmbedding(nn.Module):
    """Sum of one embedding per categorical column: ``(M, C)`` long -> ``(M, D)``."""

    def __init__(self, dims: Sequence[int], dim: int) -> None:
        super().__init__()
        self.embeddings = nn.ModuleList(nn.Embedding(n, dim) for n in dims)

    def reset_parameters(self) -> None:
        for embedding in self.embeddings:
            cast(nn.Embedding, embedding).reset_parameters()

    def forward(self, features: Tensor) -> Tensor:
        columns = [embedding(features[:, c]) for c, embedding in enumerate(self.embeddings)]
        return torch.stack(columns).sum(dim=0)


class _GINELayer(nn.Module):
    """One residual layer: ``h + Dropout(ReLU(LayerNorm(GINEConv(h, bond_embedding(e)))))``."""

    def __init__(self, dim: int, dropout: float) -> None:
        super().__init__()
        pyg_nn = require("torch_geometric.nn", extra=_EXTRA)
        self.bond_embedding = _CategoricalEmbedding(BOND_FEATURE_DIMS, dim)
        mlp = nn.Sequential(
            nn.Linear(dim, 2 * dim), nn.LayerNorm(2 * dim), nn.ReLU(), nn.Linear(2 * dim, dim)
        )
        self.conv = pyg_nn.GINEConv(mlp, train_eps=True)
        self.norm = nn.LayerNorm(dim)
        self.dropout = nn.Dropout(dropout)

    def reset_parameters(self) -> None:
        self.bond_embedding.reset_parameters()
        self.conv.reset_parameters()
        self.norm.reset_parameters()

    def forward(self, h: Tensor, edge_index: Tensor, edge_attr: Tensor) -> Tensor:
        update = self.conv(h, edge_index, self.bond_embedding(edge_attr))
        return h + self.dropout(torch.relu(self.norm(update)))


class GINEEncoder(GraphItems, nn.Module):
    r"""Graph isomorphism network with edge features (GINE) over molecular graphs.

    Atom and bond features (from :class:`MoleculeFeaturizer`) are embedded as a sum of one
    embedding per categorical column. Each of the :math:`L` layers applies

    .. math::
        \mathbf{h}_i^{(l+1)} = \mathbf{h}_i^{(l)} + \mathrm{Dropout}\Big(\mathrm{ReLU}\Big(
        \mathrm{LN}\Big(h_{\mathbf{\Theta}}\Big((1 + \epsilon^{(l)})\,\mathbf{h}_i^{(l)} +
        \sum_{j \in \mathcal{N}(i)} \mathrm{ReLU}\big(\mathbf{h}_j^{(l)} +
        \mathbf{e}_{j,i}^{(l)}\big)\Big)\Big)\Big)\Big)

    with :math:`h_{\mathbf{\Theta}}` the MLP Linear-LayerNorm-ReLU-Linear (width
    :math:`2D`), a learnable :math:`\epsilon^{(l)}` and per-layer bond embeddings
    :math:`\mathbf{e}^{(l)}`; a final LayerNorm follows. Every atom becomes one token, so a
    molecule with :math:`N` atoms yields :math:`N` tokens (:meth:`item_tokens`). LayerNorm (not
    BatchNorm) keeps a batch of one molecule, or of one atom, well defined.

    Args:
        hidden_dim (int, optional): width :math:`D` of atom states and of the output tokens.
            (default: :obj:`128`)
        num_layers (int, optional): number of GINE layers :math:`L`. (default: :obj:`3`)
        dropout (float, optional): dropout probability on each layer's update.
            (default: :obj:`0.0`)

    Shapes:
        - **input:** a :class:`torch_geometric.data.Batch` of :math:`B` graphs with
          ``x`` :math:`[\sum N_b, 9]`, ``edge_index`` :math:`[2, \sum 2E_b]`,
          ``edge_attr`` :math:`[\sum 2E_b, 3]` and ``batch`` :math:`[\sum N_b]`
        - **output:** tokens :math:`(B, N_{max}, D)` (zeros at padding) and a bool mask
          :math:`(B, N_{max})`, :obj:`True` for a real atom
    """

    modality = "molecule"
    item_name = "molecule"
    extra = _EXTRA

    def __init__(self, *, hidden_dim: int = 128, num_layers: int = 3, dropout: float = 0.0) -> None:
        super().__init__()
        if hidden_dim < 1:
            raise ValueError(f"hidden_dim must be >= 1, got {hidden_dim}")
        if num_layers < 1:
            raise ValueError(f"num_layers must be >= 1, got {num_layers}")
        if not 0.0 <= dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {dropout}")
        self.hidden_dim = hidden_dim
        self.num_layers = num_layers
        self.out_dim: int = hidden_dim

        self.atom_embedding = _CategoricalEmbedding(ATOM_FEATURE_DIMS, hidden_dim)
        self.layers = nn.ModuleList(_GINELayer(hidden_dim, dropout) for _ in range(num_layers))
        self.final_norm = nn.LayerNorm(hidden_dim)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        r"""Resets all learnable parameters of the module."""
        self.atom_embedding.reset_parameters()
        for layer in self.layers:
            cast(_GINELayer, layer).reset_parameters()
        self.final_norm.reset_parameters()

    def forward(self, batch: Batch) -> tuple[Tensor, Tensor]:
        r"""Encode a batch of molecular graphs into per-atom tokens.

        Args:
            batch (torch_geometric.data.Batch): graphs from :meth:`collate`.

        Returns:
            (torch.Tensor, torch.Tensor): tokens :math:`(B, N_{max}, D)` and the bool mask
            :math:`(B, N_{max})` (:obj:`True` = real atom).
        """
        to_dense_batch = require("torch_geometric.utils", extra=_EXTRA).to_dense_batch
        h = self.atom_embedding(batch.x)
        for layer in self.layers:
            h = layer(h, batch.edge_index, batch.edge_attr)
        h = self.final_norm(h)
        tokens, mask = to_dense_batch(h, batch.batch, batch_size=batch.num_graphs)
        return tokens, mask

    def extra_repr(self) -> str:
        return f"hidden_dim={self.hidden_dim}, num_layers={self.num_layers}"
