"""Shared orchestration for the experiments: run ``scifm fit`` / ``scifm predict`` through the
command line, read what MLflow recorded, and draw the plots. Nothing here trains a model itself.

Run directories go to ``experiments/runs/<name>/`` (not in git); each experiment's numbers go
to ``experiments/<experiment>/results.json`` and its plots next to it.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[1]
RUNS = REPO / "experiments" / "runs"
#: Where ../shared/data lives (the machines' offline data sets); override with SCIFM_DATA.
DATA = Path(os.environ.get("SCIFM_DATA", REPO.parent / "shared" / "data"))
TRACKING_URI = f"sqlite:///{RUNS / 'mlruns.db'}"


def scifm_cli() -> str:
    """The ``scifm`` console script of this interpreter's environment."""
    script = Path(sys.executable).with_name("scifm")
    return str(script) if script.exists() else "scifm"


def run_scifm(
    name: str, config: Path, overrides: Sequence[str] = (), *, predict_overrides: Sequence[str] = ()
) -> dict[str, Any]:
    """``scifm fit`` then ``scifm predict`` on the test split; skipped when already done.

    Returns ``{"model": dir, "predictions": jsonl, "run_id": ..., "fit_s": ..., "predict_s": ...}``
    (also kept in ``runs/<name>/run.json``).
    """
    out = RUNS / name
    record = out / "run.json"
    if record.exists():
        return dict(json.loads(record.read_text()))
    out.mkdir(parents=True, exist_ok=True)
    model_dir, predict_dir = out / "model", out / "predict"
    common = [
        "--config",
        str(config),
        f"--trainer.logger.init_args.tracking_uri={TRACKING_URI}",
        "--trainer.logger.init_args.run_name=" + name,
    ]
    start = time.perf_counter()
    _call([scifm_cli(), "fit", *common, "--output_dir", str(model_dir), *overrides], out / "fit.log")
    fit_s = time.perf_counter() - start
    start = time.perf_counter()
    _call(
        [
            scifm_cli(),
            "predict",
            *common,
            "--output_dir",
            str(predict_dir),
            "--model.init_from",
            str(model_dir),
            "--trainer.logger=false",
            *overrides,
            *predict_overrides,
        ],
        out / "predict.log",
    )
    result = {
        "name": name,
        "model": str(model_dir),
        "predictions": str(predict_dir / "predictions.jsonl"),
        "run_id": _run_id(name),
        "fit_s": round(fit_s, 1),
        "predict_s": round(time.perf_counter() - start, 1),
        "overrides": list(overrides),
    }
    record.write_text(json.dumps(result, indent=2))
    return result


def _call(cmd: list[str], log: Path) -> None:
    print("$", " ".join(cmd), flush=True)
    with log.open("w") as fh:
        proc = subprocess.run(cmd, cwd=REPO, stdout=fh, stderr=subprocess.STDOUT, check=False)
    if proc.returncode != 0:
        raise RuntimeError(f"{cmd[1]} failed (exit {proc.returncode}); see {log}")


def _run_id(name: str) -> str | None:
    from mlflow.tracking import MlflowClient

    client = MlflowClient(TRACKING_URI)
    runs = client.search_runs(
        [e.experiment_id for e in client.search_experiments()],
        filter_string=f"tags.mlflow.runName = '{name}'",
        order_by=["attributes.start_time DESC"],
        max_results=1,
    )
    return runs[0].info.run_id if runs else None


def metric_history(run_id: str, key: str) -> list[tuple[int, float]]:
    """``(step, value)`` pairs MLflow recorded for ``key`` in a run."""
    from mlflow.tracking import MlflowClient

    history = MlflowClient(TRACKING_URI).get_metric_history(run_id, key)
    return sorted((m.step, m.value) for m in history)


def read_jsonl(path: str | Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def write_results(folder: Path, results: Mapping[str, Any]) -> Path:
    path = folder / "results.json"
    path.write_text(json.dumps(results, indent=2, default=float) + "\n")
    print(f"results -> {path}")
    return path


def mean_std(values: Sequence[float]) -> dict[str, float]:
    import numpy as np

    arr = np.asarray(values, dtype=float)
    return {"mean": float(arr.mean()), "std": float(arr.std(ddof=1)) if len(arr) > 1 else 0.0, "n": len(arr)}


# -- plots ------------------------------------------------------------------------------------
def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def parity_plot(
    path: Path, y_true: Sequence[float], series: Mapping[str, Sequence[float]], *, unit: str
) -> None:
    """Predicted vs measured, one marker set per model, with the y = x line."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(5.2, 5))
    lo = min(min(y_true), *(min(v) for v in series.values()))
    hi = max(max(y_true), *(max(v) for v in series.values()))
    ax.plot([lo, hi], [lo, hi], color="grey", lw=1, ls="--")
    for (label, pred), marker in zip(series.items(), "osD^v", strict=False):
        ax.scatter(y_true, pred, s=14, alpha=0.7, marker=marker, label=label)
    ax.set_xlabel(f"measured ({unit})")
    ax.set_ylabel(f"predicted ({unit})")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def confusion_plot(
    path: Path, matrix: Sequence[Sequence[int]], classes: Sequence[str], *, title: str
) -> None:
    """Rows: true class; columns: predicted class (plus "other" when the matrix has one more)."""
    plt = _pyplot()
    import numpy as np

    m = np.asarray(matrix)
    cols = list(classes) + (["other"] if m.shape[1] > len(classes) else [])
    fig, ax = plt.subplots(figsize=(7.5, 6.5))
    ax.imshow(m, cmap="Blues")
    for i in range(m.shape[0]):
        for j in range(m.shape[1]):
            if m[i, j]:
                ax.text(j, i, str(m[i, j]), ha="center", va="center", fontsize=7)
    ax.set_xticks(range(len(cols)), cols, rotation=60, ha="right", fontsize=7)
    ax.set_yticks(range(len(classes)), classes, fontsize=7)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)


def curves_plot(path: Path, curves: Mapping[str, Sequence[tuple[int, float]]], *, ylabel: str) -> None:
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4))
    for label, points in curves.items():
        if points:
            steps, values = zip(*points, strict=True)
            ax.plot(steps, values, marker="o" if len(points) < 20 else None, ms=3, label=label)
    ax.set_xlabel("training step")
    ax.set_ylabel(ylabel)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=130)
    plt.close(fig)
