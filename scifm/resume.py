"""Exact resume, checkpoint-on-SIGTERM, atomic checkpoint files and a tracking-server probe.

What a resumed run needs to repeat an uninterrupted one bit for bit (on CPU, fixed seed):

- the weights, optimizer, LR scheduler and loop counters: Lightning's checkpoint;
- the data position (epoch, global batches the training loop consumed):
  :meth:`scifm.data_modules.base.ScifmDataModule.state_dict`, restored into the
  :class:`~scifm.sampling.GlobalBatchSampler`, which skips the consumed batches;
- the random numbers of each step: :class:`StepSeeder` reseeds ``random``, ``numpy`` and
  ``torch`` (all devices) at the start of every training step from ``(seed, global_step,
  rank)``, so a step's dropout masks do not depend on what consumed random numbers before it
  (validation, DataLoader iterators, a restart). The base seed is kept in the checkpoint.

:class:`CheckpointOnSigterm` writes ``last.ckpt`` when Lightning stops a run on SIGTERM, and
:class:`AtomicCheckpointIO` writes every checkpoint to a temporary sibling file, fsyncs it and
renames it over the target, so a killed save never leaves a truncated checkpoint behind.
"""

from __future__ import annotations

import hashlib
import os
import random
import tempfile
import warnings
from pathlib import Path
from typing import Any

import lightning as L
import numpy as np
import torch
from lightning.fabric.utilities.types import _PATH
from lightning.pytorch.callbacks import Callback, ModelCheckpoint
from lightning.pytorch.plugins.io import TorchCheckpointIO
from lightning.pytorch.utilities import rank_zero_info
from lightning.pytorch.utilities.exceptions import SIGTERMException

SIGTERM_EXIT_CODE = 143  # 128 + SIGTERM, what shells report for a process ended by SIGTERM


def step_seed(base_seed: int, global_step: int, rank: int) -> int:
    """A 32-bit seed for one training step of one rank, decorrelated from its neighbours."""
    digest = hashlib.sha256(f"{base_seed}:{global_step}:{rank}".encode()).digest()
    return int.from_bytes(digest[:4], "little")


def seed_all(seed: int) -> None:
    """Seed ``random``, ``numpy`` and ``torch`` (CPU and every accelerator)."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


class StepSeeder(Callback):
    """Reseeds every RNG at the start of each training step from ``(seed, global_step, rank)``.

    ``seed`` defaults to the run's ``seed_everything`` value (``PL_GLOBAL_SEED``) or 0. It is
    saved in the checkpoint and wins over the resumed run's own, so a resume draws the same
    random numbers as the run it continues.
    """

    def __init__(self, seed: int | None = None) -> None:
        self.seed = seed

    @property
    def state_key(self) -> str:
        return "StepSeeder"

    def setup(self, trainer: L.Trainer, pl_module: L.LightningModule, stage: str) -> None:
        if self.seed is None:
            self.seed = int(os.environ.get("PL_GLOBAL_SEED", "0"))

    def on_train_batch_start(
        self, trainer: L.Trainer, pl_module: L.LightningModule, batch: Any, batch_idx: int
    ) -> None:
        seed_all(step_seed(self.seed or 0, trainer.global_step, trainer.global_rank))

    def state_dict(self) -> dict[str, Any]:
        return {"seed": self.seed}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        saved = state_dict.get("seed")
        if saved is None:
            return
        if self.seed is not None and int(saved) != self.seed:
            warnings.warn(
                f"resuming a run seeded with {saved}; this run's seed {self.seed} is ignored "
                "so the resumed steps draw the same random numbers",
                stacklevel=2,
            )
        self.seed = int(saved)


class CheckpointOnSigterm(Callback):
    """On SIGTERM (a scheduler's preemption, ``kill``), save ``last.ckpt`` and let the run end.

    Lightning's signal handler only sets a flag; its loops raise ``SIGTERMException`` after the
    step in flight has finished (or between validation batches). This callback saves the
    checkpoint at that point, into the first ``ModelCheckpoint``'s folder (else
    ``<default_root_dir>/checkpoints``) under the name ``--ckpt_path last`` finds.
    """

    def __init__(self) -> None:
        self.saved_path: str | None = None

    def _target(self, trainer: L.Trainer) -> str:
        for callback in trainer.checkpoint_callbacks:
            if isinstance(callback, ModelCheckpoint) and callback.dirpath is not None:
                path = callback.last_model_path or os.path.join(callback.dirpath, "last.ckpt")
                # recorded in the checkpoint, so the resumed run keeps writing the same file
                callback.last_model_path = path
                return path
        return os.path.join(trainer.default_root_dir, "checkpoints", "last.ckpt")

    def on_exception(
        self, trainer: L.Trainer, pl_module: L.LightningModule, exception: BaseException
    ) -> None:
        if not isinstance(exception, SIGTERMException) or trainer.state.fn != "fit":
            return
        epoch_loop = trainer.fit_loop.epoch_loop
        progress = epoch_loop.batch_progress
        if progress.is_last_batch or progress.current.ready >= trainer.num_training_batches:
            # Stopped after an epoch's last batch: Lightning raised once the epoch was counted
            # complete but before it zeroed the epoch's batch counters. Zero them as the next
            # epoch would, or the resumed loop takes the next epoch as this one, part-done.
            progress.reset_on_run()
            epoch_loop.scheduler_progress.reset_on_run()
            epoch_loop.automatic_optimization.optim_progress.reset_on_run()
            epoch_loop.val_loop.batch_progress.total.reset()
        path = self._target(trainer)
        trainer.save_checkpoint(path)
        self.saved_path = path
        rank_zero_info(
            f"scifm: SIGTERM received; checkpoint saved to {path} at step {trainer.global_step}. "
            "Resume with the same command and --ckpt_path last"
        )


class AtomicCheckpointIO(TorchCheckpointIO):
    """``TorchCheckpointIO`` that writes a local checkpoint atomically.

    The bytes go to a temporary file in the target's own folder, are flushed to disk and then
    renamed over the target (``os.replace``: atomic on POSIX within one file system). Lightning's
    own save stages the file in the system temporary folder and *moves* it, which becomes a
    non-atomic copy when that folder is on another file system (``/tmp`` vs. a cluster's
    shared storage). Remote paths (``s3://`` ...) go through Lightning's own save.
    """

    def save_checkpoint(
        self, checkpoint: dict[str, Any], path: _PATH, storage_options: Any | None = None
    ) -> None:
        if "://" in str(path):
            super().save_checkpoint(checkpoint, path, storage_options=storage_options)
            return
        if storage_options is not None:
            raise TypeError("AtomicCheckpointIO does not take storage_options")
        target = Path(path)
        target.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp_name = tempfile.mkstemp(prefix=f".{target.name}.", suffix=".tmp", dir=target.parent)
        try:
            with os.fdopen(fd, "wb") as fh:
                torch.save(checkpoint, fh)
                fh.flush()
                os.fsync(fh.fileno())
            os.replace(tmp_name, target)
        except BaseException:
            Path(tmp_name).unlink(missing_ok=True)
            raise
        try:  # make the rename itself durable
            dir_fd = os.open(target.parent, os.O_RDONLY)
        except OSError:
            return
        try:
            os.fsync(dir_fd)
        except OSError:
            pass
        finally:
            os.close(dir_fd)


def use_atomic_checkpoint_io(trainer: L.Trainer) -> None:
    """Swap the strategy's plain ``TorchCheckpointIO`` for :class:`AtomicCheckpointIO`."""
    strategy = trainer.strategy
    if type(strategy.checkpoint_io) is TorchCheckpointIO:
        strategy.checkpoint_io = AtomicCheckpointIO()


def tracking_server_reachable(uri: str, *, timeout: float = 5.0) -> bool:
    """Whether an ``http(s)://`` MLflow tracking server answers at all (any HTTP status counts).

    Other URIs (a local ``sqlite:``/``file:`` store, ``databricks``) are not probed: True.
    """
    if not uri.startswith(("http://", "https://")):
        return True
    from mlflow.utils.credentials import get_default_host_creds
    from mlflow.utils.rest_utils import http_request

    try:
        http_request(
            get_default_host_creds(uri),
            "/api/2.0/mlflow/experiments/search",
            "GET",
            params={"max_results": 1},
            max_retries=0,
            timeout=timeout,
            raise_on_status=False,
        )
    except Exception:
        return False
    return True
