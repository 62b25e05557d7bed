"""FreeSolv hydration free energy: RF on Morgan fingerprints vs GINE + head vs scifm (head and text,
3 training seeds), and the SMILES -> IUPAC name text task (scifm vs nearest-neighbour retrieval).

    python experiments/freesolv/run.py [--text-only]
"""

from __future__ import annotations

import json
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
from run_all import RUNS

IUPAC_OVERRIDES = RUNS["freesolv_iupac_scifm"][1]


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


NAME_OVERRIDES = RUNS["freesolv_name_scifm"][1]


def name_property() -> dict:
    """IUPAC name (text only) -> hydration free energy: scifm (head and text) vs ridge regression
    on character 2-4-gram TF-IDF of the names, on the same scaffold split."""
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import Ridge

    from scifm.metrics import evaluate_file, regression_metrics

    run = run_scifm("freesolv_name_scifm", HERE / "config.yaml", NAME_OVERRIDES)
    dm = datamodule(
        HERE / "config.yaml",
        load_model(run),
        template="freesolv_name_property",
        molecule_columns=[],
        scaffold_column="smiles",
    )
    rows = by_id(read_jsonl(run["predictions"]))
    test = dm.split_records("test")
    if {r.id for r in test} != set(rows):
        raise RuntimeError("the scifm predictions are not this test split")
    fit = dm.split_records("train") + dm.split_records("val")
    vectorizer = TfidfVectorizer(analyzer="char_wb", ngram_range=(2, 4), min_df=2)
    ridge = Ridge(alpha=1.0).fit(
        vectorizer.fit_transform([str(r.row["iupac"]) for r in fit]), [float(r.row["expt"]) for r in fit]
    )
    pred = ridge.predict(vectorizer.transform([str(r.row["iupac"]) for r in test]))
    metrics = evaluate_file(run["predictions"], target_names=["expt"])
    return {
        "n_test": len(test),
        "ridge_char_ngrams": regression_metrics([float(r.row["expt"]) for r in test], pred),
        "scifm_head": metrics["head"]["expt"],
        "scifm_text": metrics["text_numeric"],
        "fit_s": run["fit_s"],
    }


if __name__ == "__main__":
    # --text-only: keep the property results already in results.json, redo the text tasks
    if "--text-only" in sys.argv:
        results = json.loads((HERE / "results.json").read_text())
        regression = (HERE / "results.md").read_text().split("\n\n")[0].strip() + "\n"
    else:
        runs = ["freesolv_scifm", "freesolv_scifm_seed1", "freesolv_scifm_seed2"]
        run_scifm("freesolv_scifm", HERE / "config.yaml")
        results = molecule_regression(HERE, HERE / "config.yaml", runs, unit="kcal/mol")
        regression = (HERE / "results.md").read_text()
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
    if (HERE.parent / "runs" / "freesolv_name_scifm" / "run.json").exists():
        named = name_property()
        results["name_property"] = named
        keys = ("rmse", "mae", "r2")
        table += "\n" + markdown_table(
            ["IUPAC name -> free energy (no structure)", "RMSE", "MAE", "R²"],
            [
                [
                    "ridge on character 2-4-grams of the name",
                    *(fmt(named["ridge_char_ngrams"][k]) for k in keys),
                ],
                ["scifm head (SmolLM2, name as text)", *(fmt(named["scifm_head"][k]) for k in keys)],
                [
                    f"scifm text answer (parsed {fmt(named['scifm_text']['parse_rate'])})",
                    *(fmt(named["scifm_text"][k]) if k in named["scifm_text"] else "-" for k in keys),
                ],
            ],
        )
    write_results(HERE, results, regression + "\n" + table)
