"""The molecule data module: templates, splits, skip-and-count, worker collation."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest
from conftest import tiny_config

from scifm import InvalidInputError
from scifm.data_modules.molecule import MoleculeDataModule
from scifm.model import ScifmModel
from scifm.templates import load_template

ROWS = [
    ("CCO", -5.0, "ethanol"),
    ("c1ccccc1", -0.9, "benzene"),
    ("c1ccccc1O", -6.6, "phenol"),
    ("Cc1ccccc1", -0.9, "toluene"),
    ("CC(=O)O", -6.7, "acetic acid"),
    ("C1CCCCC1", 1.2, "cyclohexane"),
    ("OC1CCCCC1", -5.5, "cyclohexanol"),
    ("CCCC", 2.1, "butane"),
    ("c1ccncc1", -4.7, "pyridine"),
    ("CC(C)O", -4.7, "isopropanol"),
    ("c1ccc2ccccc2c1", -2.4, "naphthalene"),
    ("CCN", -4.5, "ethylamine"),
]


@pytest.fixture(scope="module")
def model(llama_dir: Path) -> ScifmModel:
    return ScifmModel.from_config(tiny_config(llama_dir, head="regression"))


def _csv(tmp_path: Path, rows: list[tuple[str, float, str]]) -> Path:
    path = tmp_path / "mols.csv"
    pd.DataFrame(rows, columns=["smiles", "expt", "name"]).to_csv(path, index=False)
    return path


def _module(path: Path, model: ScifmModel, **kwargs: object) -> MoleculeDataModule:
    dm = MoleculeDataModule(str(path), template="freesolv", batch_size=4, **kwargs)  # type: ignore[arg-type]
    dm.attach(model)
    dm.setup("fit")
    return dm


def test_template_renders_prompt_answer_and_target(tmp_path: Path, model: ScifmModel) -> None:
    dm = _module(_csv(tmp_path, ROWS), model, fractions=(1.0, 0.0, 0.0))
    sample = next(s for s in dm.datasets["train"].samples if s.id == "mols.csv:0")
    assert sample.prompt == "What is the hydration free energy of <mol> in kcal/mol?"
    assert sample.answer == "-5.00 kcal/mol"
    assert sample.target == [-5.0]
    assert sample.items["molecule"][0].num_nodes == 3


def test_invalid_smiles_raises_with_record_or_is_skipped_and_counted(
    tmp_path: Path, model: ScifmModel
) -> None:
    rows = [*ROWS, ("C1CC", -1.0, "broken"), ("CCO", float("nan"), "no value")]
    path = _csv(tmp_path, rows)
    with pytest.raises(InvalidInputError, match=r"mols\.csv:12.*C1CC"):
        _module(path, model, fractions=(1.0, 0.0, 0.0))
    dm = _module(path, model, fractions=(1.0, 0.0, 0.0), on_error="skip")
    report = dm.reports["train (14 records)"]
    assert report.total == 14 and report.skipped == 2
    assert len(dm.datasets["train"]) == 12
    summary = report.summary("train")
    assert "skipped 2 of 14" in summary and "C1CC" in summary and "'expt' is empty" in summary


def test_missing_column_is_named(tmp_path: Path, model: ScifmModel) -> None:
    path = tmp_path / "bad.csv"
    pd.DataFrame({"SMILES": ["CCO"], "expt": [1.0]}).to_csv(path, index=False)
    with pytest.raises(InvalidInputError, match="smiles"):
        _module(path, model)


def test_scaffold_split_keeps_scaffolds_apart_and_is_seeded(tmp_path: Path, model: ScifmModel) -> None:
    from scifm.data_modules.splits import murcko_scaffold

    path = _csv(tmp_path, ROWS)
    a = _module(path, model, split="scaffold", fractions=(0.6, 0.2, 0.2), seed=1)
    b = _module(path, model, split="scaffold", fractions=(0.6, 0.2, 0.2), seed=1)
    ids = {k: [s.id for s in v.samples] for k, v in a.datasets.items()}
    assert ids == {k: [s.id for s in v.samples] for k, v in b.datasets.items()}
    assert sum(len(v) for v in ids.values()) == len(ROWS)
    smiles = dict((f"mols.csv:{i}", r[0]) for i, r in enumerate(ROWS))
    scaffolds = {k: {murcko_scaffold(smiles[i], record=i) for i in v} for k, v in ids.items()}
    assert not scaffolds["train"] & scaffolds["test"] and not scaffolds["train"] & scaffolds["val"]


def test_loaders_collate_in_worker_processes(tmp_path: Path, model: ScifmModel) -> None:
    dm = _module(_csv(tmp_path, ROWS), model, fractions=(1.0, 0.0, 0.0), num_workers=2)
    batches = list(dm.train_dataloader())
    assert sum(b["input_ids"].shape[0] for b in batches) == len(ROWS)
    first = batches[0]
    assert first["items"]["molecule"].num_graphs == first["input_ids"].shape[0]
    assert first["target"].shape == (first["input_ids"].shape[0], 1)
    out = model(first)
    assert out.loss is not None and out.head_loss is not None


def test_two_molecule_columns_fill_two_placeholders(tmp_path: Path, model: ScifmModel) -> None:
    path = tmp_path / "pairs.jsonl"
    pd.DataFrame({"a": ["CCO", "CCCC"], "b": ["c1ccccc1", "CCN"], "answer": ["first", "second"]}).to_json(
        path, orient="records", lines=True
    )
    dm = MoleculeDataModule(
        str(path), template="pair_similarity", molecule_columns=["a", "b"], fractions=(1.0, 0.0, 0.0)
    )
    dm.attach(ScifmModel.from_config(tiny_config(Path(model.config.backbone.name))))
    dm.setup("fit")
    sample = dm.datasets["train"].samples[0]
    assert len(sample.items["molecule"]) == 2 and sample.answer in {"first", "second"}


def test_sdf_input(tmp_path: Path, model: ScifmModel) -> None:
    from rdkit import Chem

    path = tmp_path / "sol.sdf"
    writer = Chem.SDWriter(str(path))
    for smi, sol in [("CCO", 1.1), ("c1ccccc1", -1.6), ("CC(=O)O", 1.2)]:
        mol = Chem.MolFromSmiles(smi)
        mol.SetProp("SOL", str(sol))
        writer.write(mol)
    writer.close()
    dm = MoleculeDataModule(
        str(path), template="solubility", molecule_columns="mol", fractions=(1.0, 0.0, 0.0)
    )
    dm.attach(model)
    dm.setup("fit")
    assert sorted(s.answer for s in dm.datasets["train"].samples) == [
        "-1.60 log(mol/L)",
        "1.10 log(mol/L)",
        "1.20 log(mol/L)",
    ]


def test_every_bundled_template_loads() -> None:
    from importlib import resources

    names = [p.name.removesuffix(".yaml") for p in (resources.files("scifm.configs") / "templates").iterdir()]
    assert "freesolv" in names
    for name in names:
        template = load_template(name)
        assert template.prompt.strip() and set(template.fields()) >= set(template.targets)
    with pytest.raises(FileNotFoundError, match="neither a file nor a bundled template"):
        load_template("no-such-template")


def test_predict_file_keeps_references_when_it_has_the_answer_columns(
    tmp_path: Path, model: ScifmModel
) -> None:
    train = _csv(tmp_path, ROWS)
    scored = tmp_path / "scored.csv"
    pd.DataFrame([("CCO", -5.0), ("CCCl", None)], columns=["smiles", "expt"]).to_csv(scored, index=False)
    bare = tmp_path / "bare.csv"
    pd.DataFrame([("CCO",)], columns=["smiles"]).to_csv(bare, index=False)
    for path, expected in ((scored, [("-5.00 kcal/mol", [-5.0]), (None, None)]), (bare, [(None, None)])):
        dm = _module(train, model, predict_path=str(path))
        got = [(s.answer, s.target) for s in dm.datasets["predict"]]
        assert got == expected, path.name  # an empty answer cell leaves that record unscored
