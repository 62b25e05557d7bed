"""AFLOW crystal prototypes: structure -> Pearson symbol and Strukturbericht designation, and
formula -> CIF generation validity.

Structure types: scifm (SmolLM2 + CGCNN) answers with the prototype's description, from which
the Pearson symbol and Strukturbericht designation are read; compared with the most frequent
training label, a CGCNN encoder + classification head alone, and (not learned) the Pearson
symbol spglib derives from the structure itself. CIFs: the scifm text -> CIF run's generations,
scored with ``scifm.encoders.crystal.cif_validity``, next to the reference CIFs themselves.

    python experiments/crystal_prototypes/run.py [--cif-only]
"""

from __future__ import annotations

import dataclasses
import json
import sys
from collections import Counter
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
from common import (
    RUNS,
    by_id,
    datamodule,
    fmt,
    load_model,
    markdown_table,
    read_jsonl,
    run_scifm,
    split_samples,
    summarize,
    write_results,
)

SEEDS = (0, 1, 2)
FIELDS = {"pearson": "Pearson symbol ", "strukturbericht": "Strukturbericht designation "}


def read_field(description: str, field: str) -> str:
    """The value after ``Pearson symbol`` / ``Strukturbericht designation`` in a description
    ("none" when the text does not name one)."""
    for part in description.strip().rstrip(".").split(";"):
        part = part.strip()
        if part.startswith(FIELDS[field]):
            return part[len(FIELDS[field]) :].strip()
    return "none"


def spglib_pearson(structure: object) -> str:
    """The Pearson symbol from symmetry analysis: crystal family + centring + atoms per cell."""
    from pymatgen.symmetry.analyzer import SpacegroupAnalyzer

    sga = SpacegroupAnalyzer(structure, symprec=0.1)
    family = {
        "triclinic": "a",
        "monoclinic": "m",
        "orthorhombic": "o",
        "tetragonal": "t",
        "trigonal": "h",
        "hexagonal": "h",
        "cubic": "c",
    }[sga.get_crystal_system()]
    centring = sga.get_space_group_symbol()[0]
    if centring == "R":
        return f"hR{len(sga.get_primitive_standard_structure())}"
    centring = "C" if centring in "ABC" else centring  # AFLOW writes base-centred cells as C
    return f"{family}{centring}{len(sga.get_conventional_standard_structure())}"


def accuracy(truth: list[str], pred: list[str]) -> float:
    return sum(t == p for t, p in zip(truth, pred, strict=True)) / len(truth)


def structure_types() -> dict:
    from scifm.baselines import HeadTraining, fit_encoder_head

    config = HERE / "config.yaml"
    run = run_scifm("crystal_pearson_scifm", config)
    model = load_model(run)
    dm = datamodule(config, model)
    samples = {s: split_samples(dm, s) for s in ("train", "val", "test")}
    records = {s: dm.split_records(s) for s in samples}
    rows = by_id(read_jsonl(run["predictions"]))
    if set(rows) != {x.id for x in samples["test"]}:
        raise RuntimeError("the scifm predictions are not this test split")
    out: dict = {"data": {s: len(v) for s, v in samples.items()}, "scifm_fit_s": run["fit_s"]}
    for field in FIELDS:
        truth = {s: [str(r.row[field] or "none") for r in records[s]] for s in samples}
        classes = sorted(set(truth["train"]))
        majority = Counter(truth["train"]).most_common(1)[0][0]
        scifm = [read_field(rows[x.id]["generated"], field) for x in samples["test"]]
        result = {
            "test_classes_unseen_in_train": sum(t not in classes for t in truth["test"]),
            "majority_class": {
                "label": majority,
                "accuracy": accuracy(truth["test"], [majority] * len(scifm)),
            },
            "scifm_text": {"accuracy": accuracy(truth["test"], scifm)},
        }
        if field == "strukturbericht":  # over the prototypes that have a designation
            named = [i for i, t in enumerate(truth["test"]) if t != "none"]
            result["scifm_text"]["accuracy_named_only"] = accuracy(
                [truth["test"][i] for i in named], [scifm[i] for i in named]
            )
            result["n_named_test"] = len(named)
        if field == "pearson":
            rule = [spglib_pearson(r.values["crystal"][0]) for r in records["test"]]
            result["spglib_rule"] = {"accuracy": accuracy(truth["test"], rule)}

        def labelled(split: str, truth: dict = truth, classes: list = classes) -> list:
            return [
                dataclasses.replace(x, target=classes.index(t) if t in classes else 0)
                for x, t in zip(samples[split], truth[split], strict=True)
            ]

        head_runs = []
        for seed in SEEDS:
            head, _ = fit_encoder_head(
                model.config.encoder_for("crystal"),
                labelled("train"),
                labelled("val"),
                task="classification",
                num_outputs=len(classes),
                training=HeadTraining(epochs=150, patience=25, seed=seed),
            )
            pred = [classes[i] for i in head.predict(samples["test"]).argmax(1)]
            head_runs.append({"accuracy": accuracy(truth["test"], pred)})
        result["cgcnn_head"] = {"per_seed": head_runs, **summarize(head_runs, ["accuracy"])}
        result["examples"] = [
            {"truth": t, "scifm": p} for t, p in list(zip(truth["test"], scifm, strict=True))[:8]
        ]
        out[field] = result
    out["generated_examples"] = [rows[x.id]["generated"] for x in samples["test"][:5]]
    return out


def cif_generation() -> dict | None:
    from scifm.encoders.crystal import cif_validity

    if not (RUNS / "cif_generation_scifm" / "run.json").exists():
        return None  # trained by experiments/run_all.py (~25 min on 2 CPU cores)
    config = HERE / "cif_generation.yaml"
    run = run_scifm("cif_generation_scifm", config)
    dm = datamodule(config, load_model(run))
    rows = by_id(read_jsonl(run["predictions"]))
    test = [r for r in dm.split_records("test") if r.id in rows]  # the run may score a subset
    formulas = [str(r.row["formula"]) for r in test]
    generated = cif_validity([rows[r.id]["generated"] for r in test], expected_formulas=formulas)
    reference = cif_validity([str(r.row["cif"]) for r in test], expected_formulas=formulas)
    keys = ("parse_rate", "composition_rate", "distance_rate", "charge_balance_rate", "valid_rate")
    return {
        "n_test": len(test),
        "scifm": {k: generated[k] for k in keys},
        "reference_cifs": {k: reference[k] for k in keys},
        "fit_s": run["fit_s"],
        "predict_s": run["predict_s"],
        "errors": Counter(
            str(d["error"]).split(":")[0] for d in generated["details"] if d["error"]
        ).most_common(5),
        "example": rows[test[0].id]["generated"][:800],
    }


if __name__ == "__main__":
    # --cif-only: keep the structure-type results already in results.json, add the CIF run's
    if "--cif-only" in sys.argv:
        results = json.loads((HERE / "results.json").read_text())
    else:
        results = structure_types()
    p, s = results["pearson"], results["strukturbericht"]
    table = markdown_table(
        ["structure -> label (test set)", "Pearson symbol accuracy", "Strukturbericht accuracy"],
        [
            [
                "most frequent training label",
                fmt(p["majority_class"]["accuracy"]),
                fmt(s["majority_class"]["accuracy"]),
            ],
            [
                "CGCNN + classification head (no LLM)",
                fmt(p["cgcnn_head"]["accuracy"]),
                fmt(s["cgcnn_head"]["accuracy"]),
            ],
            [
                "scifm text answer (SmolLM2 + CGCNN)",
                fmt(p["scifm_text"]["accuracy"]),
                fmt(s["scifm_text"]["accuracy"]),
            ],
            ["spglib symmetry analysis (not learned)", fmt(p["spglib_rule"]["accuracy"]), "-"],
        ],
    )
    cifs = cif_generation()
    if cifs is not None:
        results["cif_generation"] = cifs
        keys = ("parse_rate", "composition_rate", "distance_rate", "charge_balance_rate", "valid_rate")
        table += "\n" + markdown_table(
            ["formula -> CIF", "parses", "composition", "distances", "charge balance", "valid"],
            [
                ["scifm generated", *(fmt(cifs["scifm"][k]) for k in keys)],
                ["reference CIFs", *(fmt(cifs["reference_cifs"][k]) for k in keys)],
            ],
        )
    write_results(HERE, results, table)
