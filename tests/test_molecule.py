"""Molecule featurizer and GINE encoder, table readers and splits. Fixtures built in code."""

from __future__ import annotations

import json
import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

pytest.importorskip("rdkit")
pytest.importorskip("torch_geometric")

from rdkit import Chem

from scifm.data_modules.readers import check_columns, read_table
from scifm.data_modules.splits import (
    group_split,
    murcko_scaffold,
    random_split,
    scaffold_split,
)
from scifm.encoders.molecule import (
    ATOM_FEATURE_DIMS,
    BOND_FEATURE_DIMS,
    CHIRALITY_TAGS,
    FORMAL_CHARGES,
    HYBRIDIZATIONS,
    GINEEncoder,
    MoleculeFeaturizer,
    parse_molecule,
)
from scifm.errors import InvalidInputError

ATOM_CHIRALITY, ATOM_CHARGE, ATOM_HYBRIDIZATION, ATOM_AROMATIC, ATOM_IN_RING = 1, 3, 6, 7, 8
BOND_TYPE, BOND_STEREO_COL = 0, 1


@pytest.fixture(scope="module")
def featurizer() -> MoleculeFeaturizer:
    return MoleculeFeaturizer()


# ---------------------------------------------------------------- parsing and featurizing


def test_import_does_not_load_rdkit(tmp_path: Path) -> None:
    code = (
        "import sys, scifm.encoders.molecule, scifm.data_modules.readers, "
        "scifm.data_modules.splits; "
        "assert 'rdkit' not in sys.modules and 'torch_geometric' not in sys.modules"
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(p for p in sys.path if p)}
    subprocess.run([sys.executable, "-c", code], check=True, cwd=tmp_path, env=env)


def test_feature_dims_match_vocabularies() -> None:
    assert len(ATOM_FEATURE_DIMS) == 9 and len(BOND_FEATURE_DIMS) == 3
    assert ATOM_FEATURE_DIMS[0] == 119  # 1..118 + other


def test_graph_shapes_and_ranges(featurizer: MoleculeFeaturizer) -> None:
    data = featurizer("CC(=O)Oc1ccccc1C(=O)O", record="aspirin")
    n, e = 13, 13
    assert data.num_nodes == n
    assert data.x.shape == (n, 9) and data.x.dtype == torch.long
    assert data.edge_index.shape == (2, 2 * e) and data.edge_index.dtype == torch.long
    assert data.edge_attr.shape == (2 * e, 3) and data.edge_attr.dtype == torch.long
    for column, size in enumerate(ATOM_FEATURE_DIMS):
        assert int(data.x[:, column].min()) >= 0 and int(data.x[:, column].max()) < size
    for column, size in enumerate(BOND_FEATURE_DIMS):
        assert int(data.edge_attr[:, column].min()) >= 0
        assert int(data.edge_attr[:, column].max()) < size
    # both directions of every bond
    pairs = {tuple(p) for p in data.edge_index.t().tolist()}
    assert all((j, i) in pairs for i, j in pairs)


def test_charged_atom(featurizer: MoleculeFeaturizer) -> None:
    data = featurizer("C[N+](C)(C)C", record="tetramethylammonium")
    nitrogen = data.x[1]
    assert nitrogen[0] == 7 - 1
    assert nitrogen[ATOM_CHARGE] == FORMAL_CHARGES.index(1)
    assert data.x[0, ATOM_CHARGE] == FORMAL_CHARGES.index(0)


def test_tetrahedral_chirality_differs_from_mirror(featurizer: MoleculeFeaturizer) -> None:
    l_ala = featurizer("C[C@H](N)C(=O)O", record="L-Ala")
    d_ala = featurizer("C[C@@H](N)C(=O)O", record="D-Ala")
    plain = featurizer("CC(N)C(=O)O", record="Ala")
    tags = {int(g.x[1, ATOM_CHIRALITY]) for g in (l_ala, d_ala)}
    assert len(tags) == 2
    assert int(plain.x[1, ATOM_CHIRALITY]) == CHIRALITY_TAGS.index("CHI_UNSPECIFIED")
    assert not torch.equal(l_ala.x, d_ala.x)


def test_double_bond_stereo_differs_from_mirror(featurizer: MoleculeFeaturizer) -> None:
    trans = featurizer("C/C=C/C", record="E-butene")
    cis = featurizer("C/C=C\\C", record="Z-butene")

    def double_bond_stereo(data: object) -> set[int]:
        attr = data.edge_attr  # type: ignore[attr-defined]
        return {int(a[BOND_STEREO_COL]) for a in attr if int(a[BOND_TYPE]) == 1}

    assert double_bond_stereo(trans) != double_bond_stereo(cis)
    assert len(double_bond_stereo(trans)) == 1


def test_aromatic_flags(featurizer: MoleculeFeaturizer) -> None:
    data = featurizer("c1ccccc1", record="benzene")
    assert data.x[:, ATOM_AROMATIC].tolist() == [1] * 6
    assert data.x[:, ATOM_IN_RING].tolist() == [1] * 6
    assert data.x[:, ATOM_HYBRIDIZATION].tolist() == [HYBRIDIZATIONS.index("SP2")] * 6
    assert data.edge_attr[:, BOND_TYPE].tolist() == [3] * 12  # aromatic
    assert featurizer("CCCCCC", record="hexane").x[:, ATOM_AROMATIC].tolist() == [0] * 6


def test_salt_keeps_fragments_unless_asked(featurizer: MoleculeFeaturizer) -> None:
    salt = featurizer("[Na+].[Cl-]", record="NaCl")
    assert salt.num_nodes == 2 and salt.edge_index.shape == (2, 0)
    assert salt.edge_attr.shape == (0, 3)
    acetate = "CC(=O)[O-].[Na+]"
    assert featurizer(acetate, record="NaOAc").num_nodes == 5
    largest = MoleculeFeaturizer(largest_fragment=True)
    assert largest(acetate, record="NaOAc").num_nodes == 4
    assert largest.config() == {"largest_fragment": True}


def test_accepts_mol_objects(featurizer: MoleculeFeaturizer) -> None:
    mol = Chem.MolFromSmiles("CCO")
    assert parse_molecule(mol, record="r") is mol
    assert torch.equal(featurizer(mol, record="r").x, featurizer("CCO", record="r").x)
    with pytest.raises(InvalidInputError, match="no atoms"):
        parse_molecule(Chem.Mol(), record="empty-mol")


@pytest.mark.parametrize(
    ("smiles", "reason"),
    [
        ("C1CC", "unclosed ring"),
        ("not a smiles", "whitespace"),
        ("c1cccc1", "kekulize"),
        ("C[N+](C)(C)(C)C", "valence"),
        ("CC(", "syntax error"),
        ("", "empty"),
        ("   ", "empty"),
    ],
)
def test_invalid_smiles_names_record_and_value(
    featurizer: MoleculeFeaturizer, smiles: str, reason: str
) -> None:
    with pytest.raises(InvalidInputError) as info:
        featurizer(smiles, record="train.csv:row 42")
    message = str(info.value)
    assert "train.csv:row 42" in message
    assert repr(smiles) in message
    assert reason in message
    assert info.value.record == "train.csv:row 42"


@pytest.mark.parametrize("value", [None, 3.5, ["CCO"]])
def test_non_string_values_raise(value: object) -> None:
    with pytest.raises(InvalidInputError, match="row 7"):
        parse_molecule(value, record="row 7")  # type: ignore[arg-type]


def test_long_smiles_is_truncated_in_message() -> None:
    with pytest.raises(InvalidInputError) as info:
        parse_molecule("C1" + "C" * 5000, record="r")
    assert len(str(info.value)) < 400


def test_invalid_smiles_does_not_log_to_stderr(capfd: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(InvalidInputError):
        parse_molecule("c1cccc1", record="r")
    with pytest.raises(InvalidInputError):
        parse_molecule("C1CC", record="r")
    assert capfd.readouterr().err == ""


@settings(max_examples=200, deadline=None)
@given(st.text(max_size=40) | st.text(alphabet="CNOcnos()[]=#@+-123456789/\\.%", max_size=40))
def test_random_text_raises_only_invalid_input(text: str) -> None:
    try:
        mol = parse_molecule(text, record="fuzz")
    except InvalidInputError as exc:
        assert exc.record == "fuzz"
    else:
        assert mol.GetNumAtoms() > 0


def test_featurizer_pickles(featurizer: MoleculeFeaturizer) -> None:
    for original in (featurizer, MoleculeFeaturizer(largest_fragment=True)):
        clone = pickle.loads(pickle.dumps(original))
        assert clone.config() == original.config()
        a, b = clone("CC(=O)[O-].[Na+]", record="r"), original("CC(=O)[O-].[Na+]", record="r")
        assert torch.equal(a.x, b.x) and torch.equal(a.edge_index, b.edge_index)


# ---------------------------------------------------------------- encoder


@pytest.fixture()
def encoder() -> GINEEncoder:
    torch.manual_seed(0)
    return GINEEncoder(hidden_dim=32, num_layers=2)


def test_encoder_shapes_and_mask(featurizer: MoleculeFeaturizer, encoder: GINEEncoder) -> None:
    smiles = ["C", "[Na+].[Cl-]", "c1ccccc1O"]
    items = [featurizer(s, record=f"m{i}") for i, s in enumerate(smiles)]
    assert [GINEEncoder.item_tokens(item) for item in items] == [1, 2, 7]
    tokens, mask = encoder(GINEEncoder.collate(items))
    assert encoder.out_dim == 32 and GINEEncoder.modality == "molecule"
    assert tokens.shape == (3, 7, 32) and mask.shape == (3, 7) and mask.dtype == torch.bool
    assert mask.sum(dim=1).tolist() == [1, 2, 7]
    assert torch.all(tokens[~mask] == 0)
    assert torch.isfinite(tokens).all()


def test_encoder_single_atom_batch(featurizer: MoleculeFeaturizer, encoder: GINEEncoder) -> None:
    tokens, mask = encoder(GINEEncoder.collate([featurizer("[Na+]", record="Na")]))
    assert tokens.shape == (1, 1, 32) and mask.tolist() == [[True]]


def test_encoder_tokens_do_not_depend_on_batch_mates(
    featurizer: MoleculeFeaturizer, encoder: GINEEncoder
) -> None:
    encoder.eval()
    ethanol = featurizer("CCO", record="a")
    alone, _ = encoder(GINEEncoder.collate([ethanol]))
    together, _ = encoder(GINEEncoder.collate([featurizer("c1ccccc1", record="b"), ethanol]))
    torch.testing.assert_close(together[1, :3], alone[0])


def test_encoder_gradients_flow(featurizer: MoleculeFeaturizer, encoder: GINEEncoder) -> None:
    batch = GINEEncoder.collate([featurizer(s, record=s) for s in ("CCO", "C", "c1ccncc1")])
    tokens, mask = encoder(batch)
    tokens[mask].pow(2).mean().backward()
    for name, parameter in encoder.named_parameters():
        assert parameter.grad is not None, name
    assert encoder.atom_embedding.embeddings[0].weight.grad.abs().sum() > 0
    assert encoder.layers[0].bond_embedding.embeddings[0].weight.grad.abs().sum() > 0


def test_encoder_reset_parameters_and_validation(encoder: GINEEncoder) -> None:
    before = encoder.atom_embedding.embeddings[0].weight.clone()
    encoder.reset_parameters()
    assert not torch.equal(before, encoder.atom_embedding.embeddings[0].weight)
    with pytest.raises(ValueError, match="num_layers"):
        GINEEncoder(num_layers=0)
    with pytest.raises(ValueError, match="empty"):
        GINEEncoder.collate([])


# ---------------------------------------------------------------- readers


ROWS = [
    {"id": "m0", "smiles": "CCO", "y": 0.5},
    {"id": "m1", "smiles": "c1ccccc1", "y": 1.5},
    {"id": "m2", "smiles": "C1CC", "y": 2.5},
]


def test_read_csv_tsv_jsonl_parquet(tmp_path: Path) -> None:
    import pandas as pd

    frame = pd.DataFrame(ROWS)
    frame.to_csv(tmp_path / "a.csv", index=False)
    frame.to_csv(tmp_path / "a.csv.gz", index=False)
    frame.to_csv(tmp_path / "a.tsv", index=False, sep="\t")
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps(r) for r in ROWS) + "\n")
    frame.to_parquet(tmp_path / "a.parquet")
    for name in ("a.csv", "a.csv.gz", "a.tsv", "a.jsonl", "a.parquet"):
        read = read_table(tmp_path / name)
        assert read["smiles"].tolist() == ["CCO", "c1ccccc1", "C1CC"], name
        assert read["y"].tolist() == [0.5, 1.5, 2.5], name
    # an explicit format overrides the suffix
    (tmp_path / "a.txt").write_text((tmp_path / "a.csv").read_text())
    assert len(read_table(str(tmp_path / "a.txt"), format="csv")) == 3


def _write_sdf(path: Path) -> None:
    writer = Chem.SDWriter(str(path))
    for name, smiles, value in (("ethanol", "CCO", "1.5"), ("benzene", "c1ccccc1", "2.5")):
        mol = Chem.MolFromSmiles(smiles)
        mol.SetProp("_Name", name)
        mol.SetProp("value", value)
        mol.SetProp("smiles", smiles)
        writer.write(mol)
    writer.close()
    # A record RDKit cannot read: a carbon with five bonds (valence error), between the two.
    broken = (
        "broken\n     RDKit          2D\n\n"
        "  6  5  0  0  0  0  0  0  0  0999 V2000\n"
        + "    0.0000    0.0000    0.0000 C   0  0  0  0  0  0  0  0  0  0  0  0\n" * 6
        + "".join(f"  1  {i}  1  0\n" for i in range(2, 7))
        + "M  END\n>  <value>  (1) \n9.5\n\n>  <note>\nbad\n\n$$$$\n"
    )
    records = path.read_text().split("$$$$\n")
    path.write_text(records[0] + "$$$$\n" + broken + records[1] + "$$$$\n")


def test_read_sdf_keeps_unreadable_records(tmp_path: Path) -> None:
    path = tmp_path / "mols.sdf"
    _write_sdf(path)
    frame = read_table(path)
    assert frame["_Name"].tolist() == ["ethanol", "broken", "benzene"]
    assert frame["smiles"].tolist() == ["CCO", None, "c1ccccc1"]
    assert frame["mol"].iloc[1] is None
    assert isinstance(frame["mol"].iloc[0], Chem.Mol)
    assert frame["value"].tolist() == [1.5, 9.5, 2.5]
    assert frame["note"].iloc[1] == "bad"
    # the file's own "smiles" property does not clobber the computed column
    assert frame["smiles_sd"].tolist() == ["CCO", None, "c1ccccc1"]


def test_read_table_errors(tmp_path: Path) -> None:
    with pytest.raises(FileNotFoundError, match=r"missing\.csv"):
        read_table(tmp_path / "missing.csv")
    (tmp_path / "table.xlsx").write_text("x")
    with pytest.raises(ValueError, match="parquet"):
        read_table(tmp_path / "table.xlsx")
    with pytest.raises(ValueError, match="valid formats"):
        read_table(tmp_path / "table.xlsx", format="excel")  # type: ignore[arg-type]
    for name, text in (("empty.csv", ""), ("header.csv", "id,smiles\n"), ("empty.sdf", "")):
        (tmp_path / name).write_text(text)
        with pytest.raises(InvalidInputError, match="no records") as info:
            read_table(tmp_path / name)
        assert name in str(info.value)


def test_check_columns() -> None:
    import pandas as pd

    frame = pd.DataFrame(ROWS)
    check_columns(frame, ["smiles", "y"], source="a.csv")
    with pytest.raises(InvalidInputError) as info:
        check_columns(frame, ["smiles", "label"], source="a.csv")
    message = str(info.value)
    assert "a.csv" in message and "['label']" in message and "'id'" in message


# ---------------------------------------------------------------- splits


SPLIT_SMILES = [
    *("c1ccccc1" + tail for tail in ("C", "O", "N", "CC", "CO", "Cl", "F", "Br")),  # benzene
    *("C1CCCCC1" + tail for tail in ("C", "O", "N", "CC")),  # cyclohexane
    *("c1ccncc1" + tail for tail in ("C", "O", "N")),  # pyridine
    *("c1ccc2ccccc2c1" + tail for tail in ("C", "O")),  # naphthalene
    "C1CCNC1",
    "C1CCOC1",
    "C1CC1",
    "c1ccsc1",
    "c1ccoc1",
    "CCO",  # acyclic: empty scaffold
    "CCCC",
    "CC(=O)O",
]


def _assert_partition(split: tuple[list[int], list[int], list[int]], n: int) -> None:
    train, val, test = split
    assert sorted(train + val + test) == list(range(n))


def test_random_split() -> None:
    split = random_split(100, fractions=(0.8, 0.1, 0.1), seed=0)
    _assert_partition(split, 100)
    assert [len(s) for s in split] == [80, 10, 10]
    assert split == random_split(100, fractions=(0.8, 0.1, 0.1), seed=0)
    assert split != random_split(100, fractions=(0.8, 0.1, 0.1), seed=1)
    _assert_partition(random_split(7, fractions=(0.5, 0.25, 0.25), seed=3), 7)
    assert random_split(0, fractions=(1.0, 0.0, 0.0), seed=0) == ([], [], [])


@pytest.mark.parametrize(
    "fractions", [(0.8, 0.1), (0.8, 0.1, 0.2), (1.2, -0.1, -0.1), (float("nan"), 0.5, 0.5)]
)
def test_split_fraction_validation(fractions: tuple[float, float, float]) -> None:
    for split in (
        lambda: random_split(10, fractions=fractions, seed=0),
        lambda: group_split(list("aabbc"), fractions=fractions, seed=0),
        lambda: scaffold_split(["CCO"], fractions=fractions, seed=0),
    ):
        with pytest.raises(ValueError, match="fractions"):
            split()


def test_scaffold_split_keeps_scaffolds_apart() -> None:
    n = len(SPLIT_SMILES)
    scaffolds = [murcko_scaffold(s, record=str(i)) for i, s in enumerate(SPLIT_SMILES)]
    assert scaffolds[-1] == scaffolds[-2] == ""
    for seed in range(5):
        split = scaffold_split(SPLIT_SMILES, fractions=(0.6, 0.2, 0.2), seed=seed)
        _assert_partition(split, n)
        assert split == scaffold_split(SPLIT_SMILES, fractions=(0.6, 0.2, 0.2), seed=seed)
        owner: dict[str, int] = {}
        for part, indices in enumerate(split):
            for i in indices:
                assert owner.setdefault(scaffolds[i], part) == part, scaffolds[i]
        assert all(len(part) > 0 for part in split)
        # the biggest scaffold groups (benzene, then cyclohexane) go to train
        assert set(range(12)) <= set(split[0])


def test_scaffold_split_seeds_differ_and_invalid_smiles_named() -> None:
    splits = {
        tuple(map(tuple, scaffold_split(SPLIT_SMILES, fractions=(0.6, 0.2, 0.2), seed=s))) for s in range(5)
    }
    assert len(splits) > 1
    with pytest.raises(InvalidInputError, match=r"smiles\[1\]"):
        scaffold_split(["CCO", "C1CC"], fractions=(0.8, 0.1, 0.1), seed=0)


def test_group_split_generic_groups() -> None:
    groups = ["NaCl"] * 5 + ["CsCl"] * 3 + ["LiF", "KBr", "MgO", "CaO", "ZnS", "GaAs"]
    split = group_split(groups, fractions=(0.5, 0.25, 0.25), seed=0)
    _assert_partition(split, len(groups))
    for a, b in ((0, 1), (0, 2), (1, 2)):
        assert not {groups[i] for i in split[a]} & {groups[i] for i in split[b]}
    assert group_split([], fractions=(0.8, 0.1, 0.1), seed=0) == ([], [], [])
