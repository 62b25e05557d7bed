"""Baselines on the same samples and splits as a scifm run (scifm.baselines, split_records)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
from conftest import CELL_GENES, FREESOLV_ROWS, cell_config, tiny_config

from scifm import InvalidInputError
from scifm.baselines import HeadTraining, expression_matrix, fit_encoder_head, morgan_fingerprints
from scifm.data_modules.molecule import MoleculeDataModule
from scifm.model import ScifmModel
from scifm.tokenization import Sample


def test_morgan_fingerprints_match_rdkit_and_name_a_bad_smiles() -> None:
    from rdkit import Chem
    from rdkit.Chem import rdFingerprintGenerator

    fps = morgan_fingerprints(["CCO", Chem.MolFromSmiles("c1ccccc1O")], n_bits=1024)
    assert fps.shape == (2, 1024) and fps.dtype == np.uint8
    expected = rdFingerprintGenerator.GetMorganGenerator(radius=2, fpSize=1024).GetFingerprintAsNumPy(
        Chem.MolFromSmiles("CCO")
    )
    assert np.array_equal(fps[0], expected) and fps[0].sum() > 0
    with pytest.raises(InvalidInputError, match=r"smiles\[1\]"):
        morgan_fingerprints(["CCO", "C1CC"])


def test_split_records_follow_the_datasets_and_leave_skipped_records_out(
    tmp_path: Path, llama_dir: Path
) -> None:
    rows = [*FREESOLV_ROWS, ("not a smiles", 0.0)]
    path = tmp_path / "mols.csv"
    pd.DataFrame(rows, columns=["smiles", "expt"]).to_csv(path, index=False)
    dm = MoleculeDataModule(str(path), template="freesolv", on_error="skip", fractions=(0.6, 0.2, 0.2))
    dm.attach(ScifmModel.from_config(tiny_config(llama_dir)))
    dm.setup("fit")
    seen = []
    for split in ("train", "val", "test"):
        records = dm.split_records(split)
        assert [r.id for r in records] == [dm.datasets[split][i].id for i in range(len(dm.datasets[split]))]
        for rec, i in zip(records, range(len(records)), strict=True):
            assert dm.datasets[split][i].target == [float(rec.row["expt"])]
        seen += [r.values["molecule"][0] for r in records]
    assert sorted(seen) == sorted(s for s, _ in FREESOLV_ROWS)  # the bad record is in no split
    with pytest.raises(RuntimeError, match="no 'predict' split"):
        dm.split_records("predict")


def test_encoder_head_learns_a_molecular_property_and_is_seeded(llama_dir: Path) -> None:
    from rdkit import Chem

    model = ScifmModel.from_config(tiny_config(llama_dir))
    smiles = [s for s, _ in FREESOLV_ROWS] + ["CCCCCC", "CCCCCCCC", "c1ccc(O)cc1O", "OCCO", "CC#N", "NC(=O)N"]
    samples = [
        Sample(
            id=s,
            prompt="<mol>",
            items={"molecule": [model.featurize("molecule", s, record=s)]},
            target=[float(Chem.MolFromSmiles(s).GetNumHeavyAtoms())],  # a learnable, exact target
        )
        for s in smiles
    ]
    encoder = model.config.encoder_for("molecule")
    training = HeadTraining(epochs=60, batch_size=4, lr=3e-3, patience=60, seed=1)
    head, history = fit_encoder_head(
        encoder, samples, samples, task="regression", num_outputs=1, training=training
    )
    assert history[-1]["train_loss"] < 0.2 * history[0]["train_loss"]
    pred = head.predict(samples)[:, 0]
    truth = np.array([s.target[0] for s in samples])
    assert np.abs(pred - truth).mean() < 0.25 * truth.std()  # in the targets' own units
    assert min(h["val_loss"] for h in history) == pytest.approx(
        float(
            torch.nn.functional.mse_loss(
                torch.tensor((pred - truth.mean()) / truth.std(ddof=1)),
                torch.tensor((truth - truth.mean()) / truth.std(ddof=1)),
            )
        ),
        rel=1e-4,
    )  # the kept weights are those of the best validation epoch
    again, _ = fit_encoder_head(
        encoder, samples, samples, task="regression", num_outputs=1, training=training
    )
    assert np.array_equal(again.predict(samples), head.predict(samples))


def test_cell_baselines_use_the_models_featurization(llama_dir: Path) -> None:
    from scifm.encoders.cell import CellRow

    model = ScifmModel.from_config(cell_config(llama_dir, featurizer={"data": "log_normalized"}))
    rng = np.random.default_rng(0)
    samples = []
    for i in range(24):
        values = rng.random(len(CELL_GENES)).astype(np.float32)
        values[i % 2] += 3.0  # class = which of two marker genes is high
        row = CellRow(values=values, genes=CELL_GENES)
        samples.append(
            Sample(
                id=str(i),
                prompt="<cell>",
                items={"cell": [model.featurize("cell", row, record=str(i))]},
                target=i % 2,
            )
        )
    x = expression_matrix(samples)
    assert x.shape == (24, len(CELL_GENES))
    assert np.array_equal(x[3], samples[3].items["cell"][0].values.numpy())
    head, _ = fit_encoder_head(
        model.config.encoder_for("cell"),
        samples,
        samples,
        task="classification",
        num_outputs=2,
        training=HeadTraining(epochs=40, batch_size=8, lr=3e-3, seed=0),
    )
    assert (head.predict(samples).argmax(1) == np.arange(24) % 2).all()
