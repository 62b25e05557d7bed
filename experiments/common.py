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


def write_results(folder: Path, results: Mapping[str, Any], table: str) -> Path:
    """Print ``table`` and write it to ``results.md``, and ``results`` to ``results.json``."""
    print(table)
    (folder / "results.md").write_text(table)
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


# -- data, exactly as the scifm run saw it ---------------------------------------------------------
def datamodule(config: Path, model: Any, **overrides: Any) -> Any:
    """The config's data module, attached to ``model`` (its featurizers and tokenizer) and set up,
    so baselines get the very splits, records and featurized items the scifm run used."""
    import importlib

    import yaml

    data = yaml.safe_load(config.read_text())["data"]
    module, _, name = data["class_path"].rpartition(".")
    args = {**data.get("init_args", {}), **overrides}
    path = REPO / str(args["path"])
    if path.exists():  # config paths are relative to the repository root
        args["path"] = str(path)
    dm = getattr(importlib.import_module(module), name)(**args)
    dm.attach(model)
    dm.setup("fit")
    return dm


def split_samples(dm: Any, split: str) -> list[Any]:
    dataset = dm.datasets[split]
    return [dataset[i] for i in range(len(dataset))]


def load_model(run: Mapping[str, Any]) -> Any:
    from scifm.model import ScifmModel

    return ScifmModel.from_pretrained(run["model"])


def by_id(rows: Sequence[Mapping[str, Any]]) -> dict[str, Mapping[str, Any]]:
    return {str(r["id"]): r for r in rows}


def summarize(per_seed: Sequence[Mapping[str, float]], keys: Sequence[str]) -> dict[str, dict[str, float]]:
    """``{key: mean_std([...])}`` over seeds."""
    return {k: mean_std([m[k] for m in per_seed]) for k in keys}


def fmt(stat: Mapping[str, float] | float, digits: int = 2) -> str:
    """``0.62 ± 0.03`` (mean ± sample std over seeds) or a single value."""
    if isinstance(stat, Mapping):
        if stat.get("n", 1) > 1:
            return f"{stat['mean']:.{digits}f} ± {stat['std']:.{digits}f}"
        return f"{stat['mean']:.{digits}f}"
    return f"{stat:.{digits}f}"


def markdown_table(header: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    lines += ["| " + " | ".join(r) + " |" for r in rows]
    return "\n".join(lines) + "\n"


# -- one experiment shape, shared by solubility and FreeSolv ----------------------------------
def molecule_regression(
    folder: Path, config: Path, runs: Sequence[str], *, unit: str, seeds: Sequence[int] = (0, 1, 2)
) -> dict[str, Any]:
    """RF on Morgan fingerprints, GINE + head alone (``seeds``), and the scifm runs ``runs``
    (head and text answers; several names = several training seeds), on the config's split.
    Writes ``results.json``, ``results.md`` and ``parity.png`` into ``folder``."""
    import numpy as np
    from sklearn.ensemble import RandomForestRegressor

    from scifm.baselines import HeadTraining, fit_encoder_head, morgan_fingerprints
    from scifm.metrics import evaluate_file, regression_metrics

    done = [run_scifm(name, config) if (RUNS / name / "run.json").exists() else None for name in runs]
    scifm_runs = [r for r in done if r is not None]
    if not scifm_runs:
        raise RuntimeError(f"none of the scifm runs {list(runs)} has finished; run experiments/run_all.py")
    model = load_model(scifm_runs[0])
    dm = datamodule(config, model)
    target = dm.template.targets[0]
    samples = {s: split_samples(dm, s) for s in ("train", "val", "test")}
    y = {s: np.array([x.target[0] for x in v]) for s, v in samples.items()}
    test_ids = [x.id for x in samples["test"]]
    fps = {s: morgan_fingerprints([r.values["molecule"][0] for r in dm.split_records(s)]) for s in samples}
    results: dict[str, Any] = {
        "data": {s: len(v) for s, v in samples.items()},
        "split": dm.split,
        "target": target,
        "unit": unit,
        "skipped": {k: v.skipped for k, v in dm.reports.items()},
    }
    keys = ("rmse", "mae", "r2", "pearson")
    parity: dict[str, list[float]] = {}

    rf = []
    for seed in seeds:
        forest = RandomForestRegressor(n_estimators=500, n_jobs=2, random_state=seed)
        forest.fit(np.vstack([fps["train"], fps["val"]]), np.concatenate([y["train"], y["val"]]))
        pred = forest.predict(fps["test"])
        rf.append(regression_metrics(y["test"], pred))
        parity.setdefault("random forest (Morgan r=2, 2048 bits)", list(pred))
    results["random_forest_morgan"] = {"per_seed": rf, **summarize(rf, keys)}

    gine, histories = [], []
    encoder = model.config.encoder_for("molecule")
    for seed in seeds:
        head_model, history = fit_encoder_head(
            encoder,
            samples["train"],
            samples["val"],
            task="regression",
            num_outputs=1,
            training=HeadTraining(epochs=150, patience=25, seed=seed),
        )
        pred = head_model.predict(samples["test"])[:, 0]
        gine.append(regression_metrics(y["test"], pred))
        histories.append(len(history))
        parity.setdefault("GINE + head (no LLM)", list(pred))
    results["gine_head"] = {"per_seed": gine, "epochs_run": histories, **summarize(gine, keys)}

    head_runs, text_runs, texts = [], [], []
    for run in scifm_runs:
        rows = by_id(read_jsonl(run["predictions"]))
        if set(rows) != set(test_ids):
            raise RuntimeError(f"{run['name']}: its predictions are not this test split")
        metrics = evaluate_file(run["predictions"], target_names=[target])
        head_runs.append(metrics["head"][target])
        texts.append(metrics["text_numeric"])
        if metrics["text_numeric"].get("parsed"):
            text_runs.append(metrics["text_numeric"])
        if run is scifm_runs[0]:
            parity["scifm head (SmolLM2 + GINE)"] = [rows[i]["head"][0] for i in test_ids]
            from scifm.metrics import parse_number

            text_pred = [parse_number(rows[i]["generated"]) for i in test_ids]
            results["scifm_text_examples"] = [
                {"id": i, "answer": rows[i]["answer"], "generated": rows[i]["generated"]}
                for i in test_ids[:8]
            ]
            if all(v is not None for v in text_pred):
                parity["scifm text answer"] = [float(v) for v in text_pred if v is not None]
    results["scifm_head"] = {
        "runs": [r["name"] for r in scifm_runs],
        "per_seed": head_runs,
        **summarize(head_runs, keys),
    }
    results["scifm_text"] = {"per_seed": texts, **(summarize(text_runs, keys) if text_runs else {})}
    results["scifm_text"]["parse_rate"] = mean_std([t["parse_rate"] for t in texts])
    results["scifm_fit_s"] = [r["fit_s"] for r in scifm_runs]

    parity_plot(folder / "parity.png", list(y["test"]), parity, unit=unit)
    rows_md = [
        [
            "random forest, Morgan FP",
            *(fmt(results["random_forest_morgan"][k]) for k in keys),
            str(len(seeds)),
        ],
        ["GINE + head (no LLM)", *(fmt(results["gine_head"][k]) for k in keys), str(len(seeds))],
        [
            "scifm head (SmolLM2 + GINE, LoRA)",
            *(fmt(results["scifm_head"][k]) for k in keys),
            str(len(scifm_runs)),
        ],
        [
            f"scifm text answer (parsed {fmt(results['scifm_text']['parse_rate'])})",
            *(fmt(results["scifm_text"][k]) if k in results["scifm_text"] else "-" for k in keys),
            str(len(scifm_runs)),
        ],
    ]
    table = markdown_table(["model", "RMSE", "MAE", "R²", "Pearson r", "seeds"], rows_md)
    write_results(folder, results, table)
    return results
