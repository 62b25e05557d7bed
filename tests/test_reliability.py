"""Reliability: exact resume after SIGTERM / SIGKILL, atomic checkpoints, NaN steps, an
unreachable tracking server.

The resume tests drive ``scifm fit`` in a subprocess (tests/_resume_run.py records each
step's loss bits), kill it, resume it with ``--ckpt_path last``, and compare the per-step
losses and the saved weights with an uninterrupted run, bit for bit.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pandas as pd
import pytest
import torch
from conftest import FREESOLV_ROWS, cell_config
from safetensors.torch import load_file

REPO = Path(__file__).resolve().parents[1]
HELPER = REPO / "tests" / "_resume_run.py"
ENCODER = "[{modality: molecule, kind: gine, params: {hidden_dim: 16, num_layers: 2}}]"
MAX_STEPS = 14  # 8 training samples / batch 2 = 4 steps an epoch: 3.5 epochs
ROWS = FREESOLV_ROWS


# -- helpers ------------------------------------------------------------------------------------
def _fit_args(backbone: Path, data: Path, out: Path, *, num_workers: int = 0) -> list[str]:
    return [
        "fit",
        "--config",
        str(REPO / "configs" / "quickstart.yaml"),
        "--model.model.backbone.name",
        str(backbone),
        "--model.model.backbone.max_length",
        "96",
        "--model.model.backbone.lora_dropout",
        "0.2",  # random numbers in every step: their restore is part of what is tested
        "--model.model.encoders",
        ENCODER,
        "--model.model.connector.num_heads",
        "2",
        "--model.optim.warmup_steps",
        "2",
        "--data.init_args.path",
        str(data),
        "--data.init_args.split",
        "random",
        "--data.init_args.fractions",
        "[0.8, 0.1, 0.1]",
        "--data.init_args.num_workers",
        str(num_workers),
        "--data.init_args.batch_size",
        "2",
        "--trainer.max_steps",
        str(MAX_STEPS),
        "--trainer.val_check_interval",
        "5",
        "--trainer.limit_val_batches",
        "1",
        "--trainer.logger",
        "false",
        "--trainer.enable_progress_bar",
        "false",
        "--checkpoint.every_n_train_steps",
        "3",
        "--output_dir",
        str(out),
    ]


def _start(args: list[str], cwd: Path, losses: Path, *, sleep: float = 0.0) -> subprocess.Popen[str]:
    env = {**os.environ, "SCIFM_TEST_LOSSES": str(losses), "SCIFM_TEST_SLEEP": str(sleep)}
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(REPO / "tests"), env.get("PYTHONPATH")]))
    return subprocess.Popen(
        [sys.executable, str(HELPER), *args],
        cwd=cwd,  # not the repo root: `python` there would import the source tree, not the package
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )


def _finish(proc: subprocess.Popen[str], timeout: float = 120) -> tuple[int, str]:
    output, _ = proc.communicate(timeout=timeout)
    return proc.returncode, output


def _losses(path: Path) -> dict[int, str]:
    """Step -> loss bits. A step recorded twice (by a killed run and its resume) must agree."""
    steps: dict[int, str] = {}
    if not path.exists():
        return steps
    for line in path.read_text().splitlines():
        row = json.loads(line)
        assert steps.setdefault(row["step"], row["loss"]) == row["loss"], row
    return steps


def _weights(directory: Path) -> dict[str, torch.Tensor]:
    files = sorted(directory.rglob("*.safetensors"))
    assert files, directory
    weights: dict[str, torch.Tensor] = {}
    for f in files:
        weights.update({f"{f.relative_to(directory)}:{k}": v for k, v in load_file(str(f)).items()})
    return weights


def _wait_for(predicate: Any, proc: subprocess.Popen[str], timeout: float = 90) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if proc.poll() is not None:
            output = proc.stdout.read() if proc.stdout else ""
            raise AssertionError(f"the run ended before the test could interrupt it:\n{output}")
        if time.monotonic() > deadline:
            proc.kill()
            raise AssertionError("timed out waiting for the run")
        time.sleep(0.05)


@pytest.fixture(scope="module")
def resume_data(tmp_path_factory: pytest.TempPathFactory) -> Path:
    path = tmp_path_factory.mktemp("resume-data") / "freesolv.csv"
    pd.DataFrame(ROWS, columns=["smiles", "expt"]).to_csv(path, index=False)
    return path


@pytest.fixture(scope="module")
def reference_run(
    llama_dir: Path, resume_data: Path, tmp_path_factory: pytest.TempPathFactory
) -> dict[str, Any]:
    """The uninterrupted run: per-step losses and final weights."""
    cwd = tmp_path_factory.mktemp("reference")
    losses = cwd / "losses.jsonl"
    rc, output = _finish(_start(_fit_args(llama_dir, resume_data, cwd / "model"), cwd, losses))
    assert rc == 0, output
    steps = _losses(losses)
    assert sorted(steps) == list(range(1, MAX_STEPS + 1))
    assert len(set(steps.values())) > 1
    return {"losses": steps, "weights": _weights(cwd / "model"), "dir": cwd}


def _assert_same_as_reference(reference: dict[str, Any], losses: Path, model_dir: Path) -> None:
    steps = _losses(losses)
    assert sorted(steps) == list(range(1, MAX_STEPS + 1))
    assert steps == reference["losses"]  # float.hex: every bit of every step's loss
    weights = _weights(model_dir)
    assert weights.keys() == reference["weights"].keys()
    for name, tensor in weights.items():
        assert torch.equal(tensor, reference["weights"][name]), name


# -- 1. exact resume ----------------------------------------------------------------------------
def test_resume_after_sigkill_matches_an_uninterrupted_run_bitwise(
    llama_dir: Path, resume_data: Path, tmp_path: Path, reference_run: dict[str, Any]
) -> None:
    losses = tmp_path / "losses.jsonl"
    args = [*_fit_args(llama_dir, resume_data, tmp_path / "model"), "--checkpoint.save_top_k", "-1"]
    ckpt_dir = tmp_path / "model_checkpoints"
    proc = _start(args, tmp_path, losses, sleep=0.15)
    # SIGKILL once the periodic checkpoint at step 6 exists and training went on past it
    _wait_for(lambda: len(_losses(losses)) >= 7 and (ckpt_dir / "last.ckpt").exists(), proc)
    proc.send_signal(signal.SIGKILL)
    rc, _ = _finish(proc)
    assert rc == -signal.SIGKILL
    killed_at = max(_losses(losses))
    assert killed_at < MAX_STEPS
    ckpt = torch.load(ckpt_dir / "last.ckpt", weights_only=True)  # plain data only
    assert ckpt["global_step"] % 3 == 0 and ckpt["global_step"] < killed_at
    assert ckpt["MoleculeDataModule"]["batches_consumed"] == ckpt["global_step"] % 4  # mid-epoch

    rc, output = _finish(_start([*args, "--ckpt_path", "last"], tmp_path, losses))
    assert rc == 0, output
    _assert_same_as_reference(reference_run, losses, tmp_path / "model")

    # a checkpoint at an epoch's end (step 12 = 3 epochs of 4 batches) resumes into the next epoch
    (end_of_epoch,) = ckpt_dir.glob("*step=12.ckpt")
    assert torch.load(end_of_epoch, weights_only=True)["MoleculeDataModule"]["epoch"] == 3
    again = tmp_path / "again.jsonl"
    rc, output = _finish(_start([*args, "--ckpt_path", str(end_of_epoch)], tmp_path, again))
    assert rc == 0, output
    assert sorted(_losses(again)) == [13, 14]
    again.write_text(
        again.read_text()
        + "".join(
            json.dumps({"step": s, "loss": v}) + "\n" for s, v in reference_run["losses"].items() if s <= 12
        )
    )
    _assert_same_as_reference(reference_run, again, tmp_path / "model")


def test_sigterm_saves_a_checkpoint_and_the_resume_matches_bitwise(
    llama_dir: Path, resume_data: Path, tmp_path: Path, reference_run: dict[str, Any]
) -> None:
    losses = tmp_path / "losses.jsonl"
    # two DataLoader workers prefetch batches ahead of the loop: the checkpoint must count
    # the batches trained on, not those the workers fetched
    args = _fit_args(llama_dir, resume_data, tmp_path / "model", num_workers=2)
    ckpt_dir = tmp_path / "model_checkpoints"
    proc = _start(args, tmp_path, losses, sleep=0.3)
    # during step 5 (epoch 1, batch 1 of 4), between the periodic checkpoints at 3 and 6
    _wait_for(lambda: len(_losses(losses)) >= 5, proc)
    proc.send_signal(signal.SIGTERM)
    rc, output = _finish(proc)
    assert rc == 143, output
    assert "resume with the same command and --ckpt_path last" in output
    stopped_at = max(_losses(losses))
    assert stopped_at < MAX_STEPS
    ckpt = torch.load(ckpt_dir / "last.ckpt", weights_only=True)
    assert ckpt["global_step"] == stopped_at  # the step in flight finished and was saved
    assert ckpt["MoleculeDataModule"] == {
        "epoch": stopped_at // 4,
        "batches_consumed": stopped_at % 4,
        "seed": 0,
    }

    rc, output = _finish(_start([*args, "--ckpt_path", "last"], tmp_path, losses))
    assert rc == 0, output
    _assert_same_as_reference(reference_run, losses, tmp_path / "model")


# -- 2. atomic checkpoint files -----------------------------------------------------------------
def test_an_interrupted_checkpoint_save_leaves_the_previous_file_intact(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from scifm.resume import AtomicCheckpointIO

    io = AtomicCheckpointIO()
    target = tmp_path / "ckpts" / "last.ckpt"
    io.save_checkpoint({"global_step": 1, "w": torch.ones(3)}, target)
    assert torch.load(target, weights_only=True)["global_step"] == 1

    real_save = torch.save

    def dies_halfway(obj: Any, fh: Any, *args: Any, **kwargs: Any) -> None:
        fh.write(b"PK\x03\x04 half a checkpoint")  # then the process "dies"
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", dies_halfway)
    with pytest.raises(KeyboardInterrupt):
        io.save_checkpoint({"global_step": 2, "w": torch.zeros(3)}, target)
    monkeypatch.setattr(torch, "save", real_save)
    assert torch.load(target, weights_only=True)["global_step"] == 1  # the old one, whole
    assert [p.name for p in target.parent.iterdir()] == ["last.ckpt"]  # no temp file left over


def test_the_cli_trainer_writes_checkpoints_atomically_and_they_load_weights_only(
    llama_dir: Path, resume_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from scifm.cli import main
    from scifm.resume import AtomicCheckpointIO

    seen: list[str] = []
    real = AtomicCheckpointIO.save_checkpoint

    def spy(
        self: AtomicCheckpointIO, checkpoint: dict[str, Any], path: Any, storage_options: Any = None
    ) -> None:
        seen.append(str(path))
        real(self, checkpoint, path, storage_options)

    monkeypatch.setattr(AtomicCheckpointIO, "save_checkpoint", spy)
    monkeypatch.chdir(tmp_path)
    args = _fit_args(llama_dir, resume_data, tmp_path / "model")
    args[args.index("--trainer.max_steps") + 1] = "3"
    main(args)
    assert any(p.endswith("last.ckpt") for p in seen)
    ckpt = torch.load(tmp_path / "model_checkpoints" / "last.ckpt", weights_only=True)
    assert ckpt["global_step"] == 3 and "StepSeeder" in ckpt["callbacks"]


# -- 3. safe loading ----------------------------------------------------------------------------
def test_no_torch_load_without_weights_only_in_scifm() -> None:
    import re

    calls = []
    for folder in ("scifm", "encoders", "data_modules"):
        for path in (REPO / folder).rglob("*.py"):
            for match in re.finditer(r"torch\.load\((.*?)\)", path.read_text(), flags=re.S):
                calls.append((path.name, match.group(1)))
    assert calls, "expected the CHGNet loader at least"
    assert all("weights_only=True" in args for _, args in calls), calls


def test_loading_a_cell_model_whose_gene_vocabulary_was_edited_fails_clearly(
    tmp_path: Path, llama_dir: Path
) -> None:
    pytest.importorskip("anndata")
    from scifm.model import ScifmModel

    genes = [f"G{i}" for i in range(12)]
    config = cell_config(llama_dir, genes=genes)
    saved = ScifmModel.from_config(config).save_pretrained(str(tmp_path / "cell-model"))
    ScifmModel.from_pretrained(str(saved))  # loads as saved
    meta = json.loads((saved / "config.json").read_text())
    encoder = meta["model"]["encoders"][0]
    encoder["featurizer"]["genes"] = [*genes, "G_extra"]  # another vocabulary, consistently declared
    encoder["params"]["num_genes"] = len(genes) + 1
    (saved / "config.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=r"weights do not fit the configured encoders(.|\n)*cell\.") as info:
        ScifmModel.from_pretrained(str(saved))

    # the vocabulary alone edited (num_genes left as it was): refused at the first cell, by name
    import anndata as ad
    import numpy as np

    import scifm

    encoder["params"]["num_genes"] = len(genes)
    (saved / "config.json").write_text(json.dumps(meta))
    cells = ad.AnnData(X=np.ones((2, len(genes)), dtype=np.float32), var=pd.DataFrame(index=genes))
    with pytest.raises(Exception, match=r"num_genes=12.*set encoders\[cell\]\.params\.num_genes") as info:
        scifm.load(saved, device="cpu").embed(cells=cells)
    assert "13" in str(info.value)


# -- 5. numeric faults --------------------------------------------------------------------------
def _nan_trainer(tmp_path: Path, max_steps: int) -> Any:
    import lightning as L

    return L.Trainer(
        accelerator="cpu",
        max_steps=max_steps,
        limit_val_batches=0,
        num_sanity_val_steps=0,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        gradient_clip_val=1.0,
        log_every_n_steps=1,
        default_root_dir=str(tmp_path),
    )


def _nan_module(llama_dir: Path, max_bad_steps: int, bad_steps: set[int] | None) -> Any:
    from conftest import tiny_config

    from scifm.module import OptimConfig, ScifmModule

    torch.manual_seed(0)
    module = ScifmModule(
        model=tiny_config(llama_dir, head="regression"),
        optim=OptimConfig(lr=1e-2, warmup_steps=0, max_bad_steps=max_bad_steps),
    )
    real_forward = module._forward

    def forward(batch: dict[str, Any]) -> Any:
        out = real_forward(batch)
        if module.training and (bad_steps is None or module.trainer.global_step in bad_steps):
            out.loss = out.loss * float("nan")  # as a NaN target or an overflow would
        return out

    module._forward = forward  # type: ignore[method-assign]
    return module


def test_nan_loss_steps_are_skipped_counted_and_leave_the_weights_alone(
    llama_dir: Path, resume_data: Path, tmp_path: Path
) -> None:
    import lightning as L

    from scifm.data_modules.molecule import MoleculeDataModule

    module = _nan_module(llama_dir, max_bad_steps=3, bad_steps={2, 3})
    dm = MoleculeDataModule(str(resume_data), template="freesolv", batch_size=2, split="random")
    snapshots: dict[int, dict[str, torch.Tensor]] = {}
    lrs: dict[int, float] = {}

    class Snapshot(L.Callback):
        def on_train_batch_start(
            self, trainer: L.Trainer, pl_module: Any, batch: Any, batch_idx: int
        ) -> None:
            snapshots[trainer.global_step] = {
                n: p.detach().clone() for n, p in pl_module.named_parameters() if p.requires_grad
            }
            lrs[trainer.global_step] = trainer.optimizers[0].param_groups[0]["lr"]

    trainer = _nan_trainer(tmp_path, max_steps=6)
    trainer.callbacks.append(Snapshot())  # type: ignore[attr-defined]
    trainer.fit(module, datamodule=dm)
    assert trainer.global_step == 6  # training went on
    for step in (2, 3):  # the NaN steps changed nothing
        assert all(torch.equal(snapshots[step][n], snapshots[step + 1][n]) for n in snapshots[step])
    assert any(not torch.equal(snapshots[1][n], snapshots[2][n]) for n in snapshots[1])  # a good step did
    assert all(torch.isfinite(p).all() for p in module.parameters())
    assert lrs[3] != lrs[2]  # the LR schedule still advances through skipped steps
    assert trainer.callback_metrics["train/skipped_steps"] == 2
    assert module._bad_steps == 0 and module._skipped_steps == 2


def test_too_many_nan_steps_in_a_row_stop_training_with_a_clear_message(
    llama_dir: Path, resume_data: Path, tmp_path: Path
) -> None:
    from scifm.data_modules.molecule import MoleculeDataModule
    from scifm.module import NonFiniteLossError, OptimConfig

    module = _nan_module(llama_dir, max_bad_steps=3, bad_steps=None)
    dm = MoleculeDataModule(str(resume_data), template="freesolv", batch_size=2, split="random")
    with pytest.raises(NonFiniteLossError, match=r"NaN/Inf for 3 steps in a row.*max_bad_steps=3"):
        _nan_trainer(tmp_path, max_steps=10).fit(module, datamodule=dm)
    assert OptimConfig().max_bad_steps == 10
    with pytest.raises(ValueError, match="max_bad_steps"):
        OptimConfig(max_bad_steps=0)


def test_gradient_clipping_is_on_by_default_and_a_config_can_change_it(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    from scifm.cli import ScifmCLI
    from scifm.data_modules.base import ScifmDataModule
    from scifm.module import ScifmModule

    def clip(extra: list[str]) -> Any:
        cli = ScifmCLI(
            ScifmModule,
            ScifmDataModule,
            subclass_mode_data=True,
            save_config_callback=None,
            run=False,
            args=[
                "--data",
                "scifm.data_modules.molecule.MoleculeDataModule",
                "--data.path",
                "x.csv",
                "--data.template",
                "freesolv",
                *extra,
            ],
            auto_configure_optimizers=False,
        )
        return cli.config["trainer"]["gradient_clip_val"]

    monkeypatch.setattr(ScifmCLI, "instantiate_classes", lambda self: None)
    assert clip([]) == 1.0
    assert clip(["--trainer.gradient_clip_val", "0.5"]) == 0.5


# -- 6. tracking faults -------------------------------------------------------------------------
def test_an_unreachable_mlflow_server_falls_back_to_the_local_store(
    llama_dir: Path, resume_data: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    import mlflow

    from scifm.cli import main

    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")  # fail fast if the fallback did not happen
    args = _fit_args(llama_dir, resume_data, tmp_path / "model")
    args[args.index("--trainer.max_steps") + 1] = "2"
    args[args.index("--trainer.logger") + 1] = (
        "{class_path: lightning.pytorch.loggers.MLFlowLogger, "
        "init_args: {experiment_name: scifm, tracking_uri: 'http://127.0.0.1:9'}}"  # loopback, closed port
    )
    start = time.monotonic()
    with pytest.warns(UserWarning, match=r"http://127.0.0.1:9 does not answer.*sqlite:///mlruns.db"):
        main(["fit", *args[1:], "--trainer.log_every_n_steps", "1"])
    assert time.monotonic() - start < 120
    assert (tmp_path / "model" / "config.json").is_file()  # the run finished and saved its model
    client = mlflow.MlflowClient(tracking_uri="sqlite:///mlruns.db")
    experiment = client.get_experiment_by_name("scifm")
    assert experiment is not None
    # mlflow caches one store per URI string, so an earlier test's ./mlruns.db may hold runs too
    (run,) = client.search_runs(
        [experiment.experiment_id], order_by=["attributes.start_time DESC"], max_results=1
    )
    assert "train/loss_step" in run.data.metrics and run.info.status == "FINISHED"
