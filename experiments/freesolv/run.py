"""FreeSolv hydration free energy: RF on Morgan fingerprints vs GINE + head vs scifm (head and text,
3 training seeds), and the SMILES -> IUPAC name text task (scifm vs nearest-neighbour retrieval).

    python experiments/freesolv/run.py
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
from common import (
    by_id,
    datamodule,
    fmt,
    load_model,
    markdown_table,
    molecule_regression,
    read_jsonl,
    run_scifm,
    write_results,
)

IUPAC_OVERRIDES = [
    "--model.model.head.kind=none",
    "--data.init_args.template=freesolv_name",
    "--model.model.backbone.max_length=128",
    "--trainer.max_steps=120",
]


def iupac_names() -> dict:
    """SMILES -> IUPAC name: scifm's generated names vs the name of the most similar training
    molecule (Tanimoto on Morgan fingerprints), exact match and BLEU over characters."""
    from rdkit import DataStructs
    from rdkit.Chem import rdFingerprintGenerator

    from scifm.encoders.molecule import parse_molecule
    from scifm.metrics import text_metrics

    run = run_scifm("freesolv_iupac_scifm", HERE / "config.yaml", IUPAC_OVERRIDES)
    dm = datamodule(HERE / "config.yaml", load_model(run), template="freesolv_name")
    rows = by_id(read_jsonl(run["predictions"]))
    test = [r for r in dm.split_records("test") if r.id in rows]
    train = dm.split_records("train") + dm.split_records("val")
    gen = rdFingerprintGenerator.GetMorganGenerator(radius=2, fpSize=2048)

    def fps(records: list) -> list:
        return [gen.GetFingerprint(parse_molecule(r.values["molecule"][0], record=r.id)) for r in records]

    train_fps = fps(train)
    nearest = []
    for fp in fps(test):
        sims = DataStructs.BulkTanimotoSimilarity(fp, train_fps)
        nearest.append(str(train[int(np.argmax(sims))].row["iupac"]))
    answers = [str(r.row["iupac"]) for r in test]
    scifm = [str(rows[r.id]["generated"]) for r in test]
    return {
        "n_test": len(test),
        "nearest_neighbour": text_metrics(answers, nearest),
        "scifm": text_metrics(answers, scifm),
        "fit_s": run["fit_s"],
        "examples": [
            {"smiles": str(r.values["molecule"][0]), "answer": a, "scifm": g, "nearest_neighbour": n}
            for r, a, g, n in list(zip(test, answers, scifm, nearest, strict=True))[:10]
        ],
    }


if __name__ == "__main__":
    runs = ["freesolv_scifm", "freesolv_scifm_seed1", "freesolv_scifm_seed2"]
    run_scifm("freesolv_scifm", HERE / "config.yaml")
    results = molecule_regression(HERE, HERE / "config.yaml", runs, unit="kcal/mol")
    names = iupac_names()
    results["iupac"] = names
    table = markdown_table(
        ["SMILES -> IUPAC name", "exact match", "BLEU (characters)", "BLEU (words)"],
        [
            [label, *(fmt(names[key][k]) for k in ("exact_match", "bleu_char", "bleu_word"))]
            for label, key in (
                ("nearest training molecule (Tanimoto)", "nearest_neighbour"),
                ("scifm", "scifm"),
            )
        ],
    )
    print(table)
    with (HERE / "results.md").open("a") as fh:
        fh.write("\n" + table)
    write_results(HERE, results)
