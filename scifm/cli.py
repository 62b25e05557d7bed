"""``scifm fit | validate | test | predict --config FILE`` through Lightning's LightningCLI, and
``scifm export CHECKPOINT --output_dir DIR`` (a training checkpoint -> a saved model).

scifm adds to LightningCLI: MLflow as the default logger (a local SQLite store), saving the
trained model with ``save_pretrained`` into ``--output_dir`` after ``fit``, logging that
directory, the resolved config and the data report to the MLflow run, and writing
predictions as JSON lines.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from lightning.pytorch import Trainer
from lightning.pytorch.callbacks import BasePredictionWriter, Callback, ModelCheckpoint
from lightning.pytorch.cli import LightningArgumentParser, LightningCLI
from lightning.pytorch.loggers import MLFlowLogger
from lightning.pytorch.utilities import rank_zero_warn
from lightning.pytorch.utilities.exceptions import SIGTERMException

from scifm.data_modules.base import ScifmDataModule
from scifm.distributed import save_pretrained_from
from scifm.module import ScifmModule
from scifm.resume import (
    SIGTERM_EXIT_CODE,
    CheckpointOnSigterm,
    StepSeeder,
    tracking_server_reachable,
    use_atomic_checkpoint_io,
)

DEFAULT_TRACKING_URI = "sqlite:///mlruns.db"


class JsonlPredictionWriter(BasePredictionWriter):
    """Appends each predicted row (``id``, ``generated``, ``head``) to a JSON-lines file."""

    def __init__(self, path: str) -> None:
        super().__init__(write_interval="batch")
        self.path = Path(path)

    def on_predict_start(self, trainer: Any, pl_module: Any) -> None:
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.path.write_text("")

    def write_on_batch_end(self, trainer: Any, pl_module: Any, prediction: Any, *args: Any) -> None:
        with self.path.open("a") as fh:
            for row in prediction:
                fh.write(json.dumps(row) + "\n")


class ScifmCLI(LightningCLI):
    def add_arguments_to_parser(self, parser: LightningArgumentParser) -> None:
        parser.add_argument(
            "--output_dir",
            type=str,
            default="outputs/model",
            help="where fit saves the trained model (save_pretrained) and predict writes predictions.jsonl",
        )
        parser.set_defaults(
            {
                # scifm's samplers shard global batches by rank themselves (scifm.sampling).
                "trainer.use_distributed_sampler": False,
                "trainer.logger": {
                    "class_path": "lightning.pytorch.loggers.MLFlowLogger",
                    "init_args": {"experiment_name": "scifm", "tracking_uri": DEFAULT_TRACKING_URI},
                },
                # a NaN-free default; a config's own trainer.gradient_clip_val wins
                "trainer.gradient_clip_val": 1.0,
            }
        )
        # Periodic checkpoints, configurable as `checkpoint: {every_n_train_steps: N, ...}`;
        # save_last keeps `--ckpt_path last` working. Dropped under enable_checkpointing: false.
        parser.add_lightning_class_args(ModelCheckpoint, "checkpoint")
        parser.set_defaults({"checkpoint.save_last": True})

    def _instantiate_trainer(self, config: dict[str, Any], callbacks: list[Callback]) -> Trainer:
        if config.get("enable_checkpointing") is False:
            callbacks = [c for c in callbacks if not isinstance(c, ModelCheckpoint)]
        callbacks = [*callbacks, StepSeeder(), CheckpointOnSigterm()]
        _fall_back_from_unreachable_tracking(config.get("logger"))
        trainer = super()._instantiate_trainer(config, callbacks)
        use_atomic_checkpoint_io(trainer)
        return trainer

    def _mlflow(self) -> MLFlowLogger | None:
        logger = self.trainer.logger
        return logger if isinstance(logger, MLFlowLogger) else None

    def _output_dir(self) -> Path:
        return Path(self.config[self.subcommand]["output_dir"])

    def _resolved_config(self) -> str:
        return str(self._parser(self.subcommand).dump(self.config[self.subcommand], skip_none=False))

    def before_fit(self) -> None:
        # Checkpoints beside the saved model, not in Lightning's <experiment>/<run> folders
        # (save_pretrained replaces output_dir whole, so they may not live inside it).
        out = self._output_dir()
        for callback in self.trainer.checkpoint_callbacks:
            if isinstance(callback, ModelCheckpoint) and callback.dirpath is None:
                callback.dirpath = str(out.with_name(out.name + "_checkpoints"))
        logger = self._mlflow()
        if logger is not None and self.trainer.is_global_zero:
            logger.experiment.log_text(logger.run_id, self._resolved_config(), "config.yaml")

    def after_fit(self) -> None:
        assert isinstance(self.model, ScifmModule)
        # every rank: under FSDP/DeepSpeed the full weights are gathered first
        saved = save_pretrained_from(self.trainer, self.model, str(self._output_dir()))
        if not self.trainer.is_global_zero:
            return
        target = Path(saved)
        (target / "training_config.yaml").write_text(self._resolved_config())
        logger = self._mlflow()
        if logger is not None:
            logger.experiment.log_artifacts(logger.run_id, str(target), "model")
            if isinstance(self.datamodule, ScifmDataModule):
                for source, report in self.datamodule.reports.items():
                    logger.experiment.log_text(
                        logger.run_id, report.summary(source), f"data/{source.split()[0]}.txt"
                    )
                    logger.experiment.log_metric(
                        logger.run_id, f"data/skipped_{source.split()[0]}", report.skipped
                    )
        prompt = "What is the hydration free energy of <mol> in kcal/mol?"
        if isinstance(self.datamodule, ScifmDataModule):
            prompt = self.datamodule.template.prompt
        examples = {
            "<mol>": 'molecules=["CCO"]',
            "<crystal>": "crystals=[structure_or_cif]",
            "<cell>": "cells=adata[:1]",
        }
        items = ", ".join(v for k, v in examples.items() if k in prompt)
        where = f" and logged to MLflow run {logger.run_id}" if logger else ""
        print(
            f"\nscifm: model saved to {target}{where}\nUse it from Python:\n"
            f"    import scifm\n    predictor = scifm.load({str(target)!r})\n"
            f"    predictor.generate([{prompt!r}]{', ' + items if items else ''})\n"
        )

    def before_predict(self) -> None:
        writer = JsonlPredictionWriter(str(self._output_dir() / "predictions.jsonl"))
        self.trainer.callbacks.append(writer)  # type: ignore[attr-defined]

    def after_predict(self) -> None:
        path = self._output_dir() / "predictions.jsonl"
        print(f"scifm: predictions written to {path}")
        if self.trainer.is_global_zero:
            self._score(path)

    def _score(self, path: Path) -> None:
        """Write ``metrics.json`` beside the predictions when the data has reference answers or
        targets (the test split, or a predict_path with answer columns); see :mod:`scifm.metrics`."""
        from scifm.metrics import evaluate_file, write_metrics

        assert isinstance(self.model, ScifmModule)
        head = self.model.model_config.head
        classes = None
        if isinstance(self.datamodule, ScifmDataModule) and self.datamodule.classes:
            classes = list(self.datamodule.classes)
        elif head.kind == "classification" and head.labels:
            classes = list(head.labels)
        names = list(head.labels) if head.kind == "regression" and head.labels else None
        metrics = evaluate_file(path, classes=classes, target_names=names)
        if "head" not in metrics and "text" not in metrics:
            return  # nothing to score against: prompts without answers
        target = write_metrics(metrics, path.with_name("metrics.json"))
        print(f"scifm: metrics written to {target}")


def _fall_back_from_unreachable_tracking(loggers: Any) -> None:
    """Point MLflow loggers whose ``http(s)://`` server does not answer at the local store.

    A tracking server that is down must not cost a training run: the run warns and records its
    params, metrics and model in ``sqlite:///mlruns.db`` (``./mlruns``) instead. Called before
    the logger first talks to its server.
    """
    for logger in loggers if isinstance(loggers, list) else [loggers]:
        if not isinstance(logger, MLFlowLogger):
            continue
        uri = str(getattr(logger, "_tracking_uri", "") or "")
        if tracking_server_reachable(uri):
            continue
        rank_zero_warn(
            f"scifm: the MLflow tracking server {uri} does not answer; this run is tracked in the local "
            f"store {DEFAULT_TRACKING_URI} instead (copy it over later with mlflow's export tools)"
        )
        from mlflow.tracking import MlflowClient

        logger._tracking_uri = DEFAULT_TRACKING_URI
        logger._mlflow_client = MlflowClient(DEFAULT_TRACKING_URI)
        logger._run_id = None  # a server run id means nothing to the local store: start a new run


def export_main(args: list[str]) -> None:
    """``scifm export CHECKPOINT --output_dir DIR``: a training checkpoint -> a saved model."""
    import argparse

    from scifm.export import export_checkpoint

    parser = argparse.ArgumentParser(
        prog="scifm export",
        description="Write the model in a Lightning checkpoint (a .ckpt file, or the directory of a "
        "sharded FSDP2/DeepSpeed checkpoint) as a directory that scifm.load reads. Runs on one process.",
    )
    parser.add_argument("checkpoint", help="e.g. outputs/model_checkpoints/last.ckpt")
    parser.add_argument("--output_dir", required=True, help="where to write the model")
    ns = parser.parse_args(args)
    target = export_checkpoint(ns.checkpoint, ns.output_dir)
    print(f"scifm: {ns.checkpoint} exported to {target}; load it with scifm.load({str(target)!r})")


def main(args: list[str] | None = None) -> None:
    """Entry point of the ``scifm`` console script."""
    argv = sys.argv[1:] if args is None else args
    if argv[:1] == ["export"]:
        export_main(argv[1:])
        return
    try:
        ScifmCLI(
            ScifmModule,
            ScifmDataModule,
            subclass_mode_data=True,
            # LightningCLI's SaveConfigCallback needs a logger with a local log_dir; the resolved
            # config is logged to MLflow and written next to the saved model instead.
            save_config_callback=None,
            args=args,
        )
    except SIGTERMException:
        # Lightning stopped after the step in flight and CheckpointOnSigterm saved last.ckpt.
        print("scifm: stopped by SIGTERM; resume with the same command and --ckpt_path last", file=sys.stderr)
        raise SystemExit(SIGTERM_EXIT_CODE) from None


if __name__ == "__main__":
    main()
