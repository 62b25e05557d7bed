"""Does the pretrained LLM help? The FreeSolv scifm run (SmolLM2-135M-Instruct weights) against
the very same run on the same architecture with random weights (``backbone.pretrained: false``):
test metrics and learning curves (MLflow).

    python experiments/pretrained_vs_random/run.py
"""

from __future__ import annotations

import sys
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))
from common import REPO, curves_plot, fmt, markdown_table, metric_history, run_scifm, write_results
from run_all import RUNS

CONFIG = REPO / "experiments" / "freesolv" / "config.yaml"
COMPARED = {
    "pretrained SmolLM2-135M-Instruct": "freesolv_scifm",
    "random init (same architecture)": "freesolv_scifm_random_init",
}
CURVES = {
    "train/lm_loss_step": "train answer-token loss",
    "val/lm_loss": "val answer-token loss",
    "val/head_loss": "val head MSE",
}


def main() -> dict:
    from scifm.metrics import evaluate_file

    results: dict = {}
    curves: dict = {key: {} for key in CURVES}
    for label, name in COMPARED.items():
        run = run_scifm(name, CONFIG, RUNS[name][1])
        metrics = evaluate_file(run["predictions"], target_names=["expt"])
        results[label] = {
            "run": name,
            "head": metrics["head"]["expt"],
            "text": metrics["text"],
            "text_numeric": metrics["text_numeric"],
            "fit_s": run["fit_s"],
            "curves": {key: metric_history(run["run_id"], key) for key in CURVES},
        }
        for key in CURVES:
            curves[key][label] = results[label]["curves"][key]
    for key, title in CURVES.items():
        curves_plot(HERE / f"{key.replace('/', '_')}.png", curves[key], ylabel=title)
    table = markdown_table(
        [
            "FreeSolv, 150 steps",
            "val answer-token loss (final)",
            "head RMSE",
            "head Pearson r",
            "text parse rate",
            "text RMSE",
        ],
        [
            [
                label,
                fmt(r["curves"]["val/lm_loss"][-1][1]),
                fmt(r["head"]["rmse"]),
                fmt(r["head"]["pearson"]),
                fmt(r["text_numeric"]["parse_rate"]),
                fmt(r["text_numeric"]["rmse"]) if r["text_numeric"].get("parsed") else "-",
            ]
            for label, r in results.items()
        ],
    )
    write_results(HERE, results, table)
    return results


if __name__ == "__main__":
    main()
