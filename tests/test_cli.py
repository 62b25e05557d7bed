"""``scifm fit`` / ``predict`` end to end through LightningCLI, with a real MLflow store."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import pytest
import yaml
from conftest import FREESOLV_ROWS

from scifm.cli import main

REPO = Path(__file__).resolve().parents[1]
ENCODER = "[{modality: molecule, kind: gine, params: {hidden_dim: 16, num_layers: 2}}]"


def _common(backbone: Path, data: Path, out: Path) -> list[str]:
    return [
        "--config",
        str(REPO / "configs" / "quickstart.yaml"),
        "--model.model.backbone.name",
        str(backbone),
        "--model.model.backbone.max_length",
        "96",
        "--model.model.encoders",
        ENCODER,
        "--model.model.connector.num_heads",
        "2",
        "--data.init_args.path",
        str(data),
        "--data.init_args.split",
        "random",
        "--data.init_args.fractions",
        "[0.6, 0.2, 0.2]",
        "--data.init_args.num_workers",
        "0",
        "--data.init_args.batch_size",
        "2",
        "--output_dir",
        str(out),
    ]


@pytest.fixture()
def freesolv_slice(tmp_path: Path) -> Path:
    rows = [*FREESOLV_ROWS, ("C1CC", 0.0)]  # the last one is invalid: skipped and counted (on_error: skip)
    path = tmp_path / "freesolv_slice.csv"
    pd.DataFrame(rows, columns=["smiles", "expt"]).to_csv(path, index=False)
    return path


def test_fit_records_an_mlflow_run_and_saves_a_loadable_model(
    llama_dir: Path,
    freesolv_slice: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.chdir(tmp_path)  # the default store is ./mlruns.db with artifacts in ./mlruns
    out = tmp_path / "model"
    main(
        [
            "fit",
            *_common(llama_dir, freesolv_slice, out),
            "--trainer.max_steps",
            "3",
            "--trainer.val_check_interval",
            "3",
            "--trainer.log_every_n_steps",
            "1",
        ]
    )
    printed = capsys.readouterr().out
    assert "scifm.load(" in printed and str(out) in printed
    assert (out / "config.json").is_file() and (out / "adapter" / "adapter_model.safetensors").is_file()
    assert list((tmp_path / "model_checkpoints").glob("*.ckpt"))  # beside the model, not inside it

    import mlflow

    client = mlflow.MlflowClient(tracking_uri="sqlite:///mlruns.db")
    experiment = client.get_experiment_by_name("scifm")
    assert experiment is not None
    (run,) = client.search_runs([experiment.experiment_id])
    assert run.info.status == "FINISHED"
    assert {"train/loss_step", "val/loss", "train/lr", "train/tokens_per_s"} <= set(run.data.metrics)
    assert run.data.params["model/stage"] == "instruct"
    assert (
        run.data.metrics["data/skipped_train"]
        + run.data.metrics.get("data/skipped_val", 0)
        + run.data.metrics.get("data/skipped_test", 0)
        == 1
    )
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"model", "config.yaml"} <= artifacts
    logged = yaml.safe_load(
        Path(client.download_artifacts(run.info.run_id, "config.yaml", str(tmp_path))).read_text()
    )
    assert logged["trainer"]["max_steps"] == 3

    import scifm

    mlflow.set_tracking_uri("sqlite:///mlruns.db")
    predictor = scifm.load(f"runs:/{run.info.run_id}/model", device="cpu")
    local = scifm.load(out, device="cpu")
    prompt = "What is the hydration free energy of <mol> in kcal/mol?"
    assert predictor.generate([prompt], molecules=["CCO"], max_new_tokens=4) == local.generate(
        [prompt], molecules=["CCO"], max_new_tokens=4
    )

    # scifm predict with the trained model writes one JSON line per test sample
    main(
        [
            "predict",
            *_common(llama_dir, freesolv_slice, out),
            "--model.init_from",
            str(out),
            "--trainer.logger",
            "false",
        ]
    )
    rows = [json.loads(line) for line in (out / "predictions.jsonl").read_text().splitlines()]
    assert rows and all({"id", "generated", "head", "answer", "target"} <= set(r) for r in rows)
    # ... and scores them against the test split's answers and targets
    metrics = json.loads((out / "metrics.json").read_text())
    assert metrics["n"] == len(rows)
    errors = [(r["target"][0] - r["head"][0]) ** 2 for r in rows]
    assert metrics["head"]["expt"]["rmse"] == pytest.approx((sum(errors) / len(errors)) ** 0.5)
    assert metrics["text"]["n"] == len(rows) and 0.0 <= metrics["text"]["exact_match"] <= 1.0
    assert rows[0]["answer"].endswith("kcal/mol")


def test_every_config_parses(monkeypatch: pytest.MonkeyPatch) -> None:
    configs = sorted((REPO / "configs").rglob("*.yaml"))
    assert configs
    for path in configs:
        assert isinstance(yaml.safe_load(path.read_text()), dict), path
    for path in sorted((REPO / "configs").glob("*.yaml")):
        with pytest.raises(SystemExit) as exit_info:
            main(["fit", "--config", str(path), "--print_config"])
        assert exit_info.value.code == 0, path
    quickstart = str(REPO / "configs" / "quickstart.yaml")
    for preset in sorted((REPO / "configs" / "trainer").glob("*.yaml")):  # presets stack on a task config
        with pytest.raises(SystemExit) as exit_info:
            main(["fit", "--config", quickstart, "--config", str(preset), "--print_config"])
        assert exit_info.value.code == 0, preset
