"""PBMC cell types (pbmc68k_reduced, bulk_labels): logistic regression on the genes vs the cell
encoder + head alone vs scifm (text answers and a classification head). Confusion matrices.

    python experiments/pbmc_cell_types/run.py
"""

from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
from common import (
    by_id,
    confusion_plot,
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
KEYS = ("accuracy", "macro_f1")


def main() -> dict:
    import numpy as np
    from sklearn.linear_model import LogisticRegression

    from scifm.baselines import HeadTraining, expression_matrix, fit_encoder_head
    from scifm.metrics import classification_metrics, evaluate_file

    config = HERE / "config.yaml"
    run = run_scifm("pbmc_scifm", config)
    model = load_model(run)
    dm = datamodule(config, model)
    classes = list(dm.classes)
    samples = {s: split_samples(dm, s) for s in ("train", "val", "test")}
    labels = {s: [classes[x.target] for x in v] for s, v in samples.items()}
    results: dict = {"data": {s: len(v) for s, v in samples.items()}, "classes": classes}

    # logistic regression on the model's own featurization (log-normalised .raw, its 765 genes)
    x = {s: expression_matrix(v) for s, v in samples.items()}
    logreg = LogisticRegression(max_iter=5000, C=0.1)
    logreg.fit(np.vstack([x["train"], x["val"]]), labels["train"] + labels["val"])
    lr_metrics = classification_metrics(labels["test"], list(logreg.predict(x["test"])), classes)
    results["logistic_regression"] = lr_metrics

    encoder_runs = []
    for seed in SEEDS:
        head, _ = fit_encoder_head(
            model.config.encoder_for("cell"),
            samples["train"],
            samples["val"],
            task="classification",
            num_outputs=len(classes),
            training=HeadTraining(epochs=150, patience=25, seed=seed),
        )
        pred = [classes[i] for i in head.predict(samples["test"]).argmax(1)]
        encoder_runs.append(classification_metrics(labels["test"], pred, classes))
    results["cell_encoder_head"] = {
        "per_seed": [{k: m[k] for k in KEYS} for m in encoder_runs],
        **summarize(encoder_runs, KEYS),
    }

    metrics = evaluate_file(run["predictions"], classes=classes)
    rows = by_id(read_jsonl(run["predictions"]))
    if set(rows) != {x.id for x in samples["test"]}:
        raise RuntimeError("the scifm predictions are not this test split")
    results["scifm_head"] = metrics["head"]
    results["scifm_text"] = metrics["text_class"]
    results["scifm_text_exact_match"] = metrics["text"]["exact_match"]
    results["scifm_fit_s"] = run["fit_s"]
    confusion_plot(
        HERE / "confusion_scifm_text.png",
        metrics["text_class"]["confusion"],
        classes,
        title=f"scifm text answers (accuracy {metrics['text_class']['accuracy']:.2f})",
    )
    confusion_plot(
        HERE / "confusion_logreg.png",
        lr_metrics["confusion"],
        classes,
        title=f"logistic regression on genes (accuracy {lr_metrics['accuracy']:.2f})",
    )
    table = markdown_table(
        ["model", "accuracy", "macro-F1", "seeds"],
        [
            ["logistic regression, 765 genes (C=0.1)", *(fmt(lr_metrics[k]) for k in KEYS), "1 (convex)"],
            ["MLP cell encoder + head (no LLM)", *(fmt(results["cell_encoder_head"][k]) for k in KEYS), "3"],
            ["scifm classification head", *(fmt(metrics["head"][k]) for k in KEYS), "1"],
            [
                f"scifm text answer ({metrics['text_class']['unparsed']} unmatched)",
                *(fmt(metrics["text_class"][k]) for k in KEYS),
                "1",
            ],
        ],
    )
    write_results(HERE, results, table)
    return results


if __name__ == "__main__":
    main()
