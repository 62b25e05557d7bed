"""The LightningModule that trains a :class:`~scifm.model.ScifmModel`."""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from typing import Any

import lightning as L
import torch

from scifm.config import ModelConfig
from scifm.export import FEATURIZERS_KEY
from scifm.model import ScifmModel, ScifmOutput


class NonFiniteLossError(RuntimeError):
    """Training stopped: the loss was NaN/Inf for ``optim.max_bad_steps`` steps in a row."""


@dataclass
class OptimConfig:
    """AdamW with linear warmup and cosine decay to ``min_lr_ratio * lr``."""

    lr: float = 1e-4
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_steps: int = 10
    min_lr_ratio: float = 0.1
    max_bad_steps: int = 10
    """A step whose loss is NaN/Inf is skipped (no update); this many in a row stop training."""

    def __post_init__(self) -> None:
        if self.lr <= 0:
            raise ValueError(f"optim.lr must be positive, got {self.lr}")
        if self.warmup_steps < 0:
            raise ValueError(f"optim.warmup_steps must be >= 0, got {self.warmup_steps}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"optim.min_lr_ratio must lie in [0, 1], got {self.min_lr_ratio}")
        if self.max_bad_steps < 1:
            raise ValueError(f"optim.max_bad_steps must be >= 1, got {self.max_bad_steps}")


class ScifmModule(L.LightningModule):
    """Trains encoders, connectors and (per ``model.stage``) LoRA adapters or the whole LLM.

    Args:
        model: the model configuration (see :class:`~scifm.config.ModelConfig`).
        optim: optimizer and schedule settings.
        init_from: a directory written by ``save_pretrained`` to start from. Saved with the
            same ``stage``: the whole model is loaded (continue training, or ``scifm predict``
            with a trained model). Saved with another stage (e.g. ``align`` continued as
            ``instruct``): its encoder, connector and head weights replace fresh ones, and the
            backbone comes from ``model.backbone``; the encoders must be configured alike.
        max_new_tokens: longest generated answer in ``scifm predict`` (default:
            ``backbone.max_length // 4``).

    Logged: ``train/loss``, ``train/lm_loss``, ``train/perplexity``, ``train/head_loss``,
    ``train/lr``, ``train/tokens_per_s``, ``train/skipped_steps`` (steps skipped for a NaN/Inf
    loss, see :meth:`training_step`), and the same losses under ``val/`` and ``test/``.
    Hyperparameters are kept as plain data so checkpoints load under ``weights_only=True``.
    """

    def __init__(
        self,
        model: ModelConfig | None = None,
        optim: OptimConfig | None = None,
        init_from: str | None = None,
        max_new_tokens: int | None = None,
    ) -> None:
        super().__init__()
        if max_new_tokens is not None and max_new_tokens <= 0:
            raise ValueError(f"max_new_tokens must be positive, got {max_new_tokens}")
        self.max_new_tokens = max_new_tokens
        self.model_config = model or ModelConfig()
        self.optim_config = optim or OptimConfig()
        self.save_hyperparameters(
            {
                "model": self.model_config.to_dict(),
                "optim": asdict(self.optim_config),
                "init_from": init_from,
                "max_new_tokens": max_new_tokens,
            }
        )
        if init_from is not None and ScifmModel.saved_stage(init_from) == self.model_config.stage:
            self.model = ScifmModel.from_pretrained(init_from)
        else:
            self.model = ScifmModel.from_config(self.model_config)
            if init_from is not None:
                self.model.load_modules(init_from)
        # HF models come out of from_pretrained in eval mode; dropout in adapters must train.
        self.model.train()
        self._step_start = 0.0
        self._bad_steps = 0  # consecutive non-finite training losses
        self._skipped_steps = 0
        self._skip_update = False
        self._sharded = False

    def setup(self, stage: str) -> None:
        """Before fit: standardize a regression head (``head.standardize``) with the training
        targets' mean and std, unless the model already has them (a resumed or continued run)."""
        head = self.model.config.head  # the loaded config when continuing from init_from
        if stage != "fit" or head.kind != "regression" or not head.standardize or head.target_mean:
            return
        datamodule = getattr(self.trainer, "datamodule", None)
        train = getattr(datamodule, "datasets", {}).get("train")
        if train is None:
            raise RuntimeError(
                "head.standardize needs the training targets: fit with a scifm data module, or set "
                "head.target_mean and head.target_std in the config"
            )
        targets = [train[i].target for i in range(len(train))]
        self.model.set_target_stats(torch.tensor(targets, dtype=torch.float64).reshape(len(targets), -1))
        # checkpoints carry the statistics too (scifm export, --ckpt_path resume)
        self.hparams["model"] = self.model.config.to_dict()

    # -- steps ---------------------------------------------------------------------------------
    def _shared_step(self, batch: dict[str, Any], split: str) -> torch.Tensor:
        out = self._forward(batch)
        assert out.loss is not None
        self._log_losses(out, split, batch["input_ids"].shape[0])
        return out.loss

    def _forward(self, batch: dict[str, Any]) -> ScifmOutput:
        out = self.model(batch)
        if out.loss is None:
            raise RuntimeError("batch had neither answer tokens nor head targets: nothing to learn from")
        return out

    def _log_losses(self, out: ScifmOutput, split: str, bs: int) -> None:
        assert out.loss is not None
        on_step = split == "train"
        self.log(f"{split}/loss", out.loss, batch_size=bs, on_step=on_step, on_epoch=True, prog_bar=True)
        if out.lm_loss is not None:
            self.log(f"{split}/lm_loss", out.lm_loss, batch_size=bs, on_step=on_step, on_epoch=True)
            self.log(
                f"{split}/perplexity",
                torch.exp(out.lm_loss.detach().clamp(max=30)),
                batch_size=bs,
                on_step=on_step,
                on_epoch=True,
            )
        if out.head_loss is not None:
            self.log(f"{split}/head_loss", out.head_loss, batch_size=bs, on_step=on_step, on_epoch=True)

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        self._step_start = time.perf_counter()

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor | None:
        """The step's loss; ``None`` (single process) when it is NaN/Inf, so nothing is updated.

        A non-finite loss on any rank skips the step on every rank: each rank learns of it
        (``reduce_boolean_decision``), and under several processes backward still runs on a
        zero loss (DDP/FSDP need every rank's backward) while :meth:`on_before_optimizer_step`
        drops the gradients, so the optimizer leaves the weights and its moments as they were.
        ``optim.max_bad_steps`` such steps in a row raise :class:`NonFiniteLossError`.
        """
        out = self._forward(batch)
        assert out.loss is not None
        finite = bool(torch.isfinite(out.loss.detach()).item())
        finite = self.trainer.strategy.reduce_boolean_decision(finite, all=True)
        self._skip_update = not finite
        if not finite:
            self._bad_steps += 1
            self._skipped_steps += 1
            self.log("train/skipped_steps", float(self._skipped_steps), on_step=True, batch_size=1)
            if self._bad_steps >= self.optim_config.max_bad_steps:
                raise NonFiniteLossError(
                    f"the training loss was NaN/Inf for {self._bad_steps} steps in a row (up to global step "
                    f"{self.trainer.global_step}; {self._skipped_steps} skipped in all), so training stopped "
                    f"(optim.max_bad_steps={self.optim_config.max_bad_steps}). Lower optim.lr, keep "
                    "gradient clipping on (trainer.gradient_clip_val), check the data for NaN/Inf targets, "
                    "or resume from the last checkpoint with --ckpt_path last"
                )
            if self.trainer.world_size > 1:
                return out.loss.nan_to_num(0.0, 0.0, 0.0) * 0.0
            return None
        self._bad_steps = 0
        self._log_losses(out, "train", batch["input_ids"].shape[0])
        self.log("train/skipped_steps", float(self._skipped_steps), on_step=True, batch_size=1)
        self.log("train/lr", self.trainer.optimizers[0].param_groups[0]["lr"], on_step=True, batch_size=1)
        return out.loss

    def on_before_optimizer_step(self, optimizer: torch.optim.Optimizer) -> None:
        if self._skip_update:  # a non-finite step under several processes: drop its gradients
            optimizer.zero_grad(set_to_none=True)

    def on_train_batch_end(self, outputs: Any, batch: Any, batch_idx: int) -> None:
        elapsed = time.perf_counter() - self._step_start
        tokens = int(batch["attention_mask"].sum())
        if elapsed > 0:
            self.log("train/tokens_per_s", tokens / elapsed, on_step=True, batch_size=1)

    def validation_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._shared_step(batch, "val")

    def test_step(self, batch: dict[str, Any], batch_idx: int) -> None:
        self._shared_step(batch, "test")

    def predict_step(
        self, batch: dict[str, Any], batch_idx: int, dataloader_idx: int = 0
    ) -> list[dict[str, Any]]:
        """One dict per sample: ``id``, ``generated`` text, ``head`` outputs (with a head), and the
        reference ``answer`` / ``target`` when the data has them."""
        limit = self.max_new_tokens or self.model_config.backbone.max_length // 4
        ids = self.model.generate_ids(batch, max_new_tokens=limit)
        texts = [t.strip() for t in self.model.tokenizer.batch_decode(ids, skip_special_tokens=True)]
        rows: list[dict[str, Any]] = [
            {"id": i, "generated": t} for i, t in zip(batch["ids"], texts, strict=True)
        ]
        # references, when the data has them, so `scifm predict` can score itself (scifm.metrics)
        for row, answer in zip(rows, batch.get("answers") or [None] * len(rows), strict=True):
            if answer is not None:
                row["answer"] = answer
        if "target" in batch:
            for row, target in zip(rows, batch["target"].tolist(), strict=True):
                row["target"] = target
        if self.model.head is not None:
            out = self.model(batch)
            assert out.head_output is not None
            for row, values in zip(rows, out.head_output.tolist(), strict=True):
                row["head"] = values
        return rows

    # -- optimisation --------------------------------------------------------------------------
    def configure_optimizers(self) -> Any:
        cfg = self.optim_config
        decay: list[torch.nn.Parameter] = []
        no_decay: list[torch.nn.Parameter] = []
        for name, p in self.model.named_parameters():
            if not p.requires_grad:
                continue
            (no_decay if p.ndim < 2 or "norm" in name.lower() else decay).append(p)
        if not decay and not no_decay:
            raise RuntimeError("no trainable parameters: check model.stage and encoders[*].trainable")
        optimizer = torch.optim.AdamW(
            [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": no_decay, "weight_decay": 0.0}],
            lr=cfg.lr,
            betas=cfg.betas,
        )
        total = max(int(self.trainer.estimated_stepping_batches), 1)
        warmup = min(cfg.warmup_steps, total)

        def factor(step: int) -> float:
            if step < warmup:
                return (step + 1) / (warmup + 1)
            progress = min((step - warmup) / max(total - warmup, 1), 1.0)
            return cfg.min_lr_ratio + (1 - cfg.min_lr_ratio) * 0.5 * (1 + math.cos(math.pi * progress))

        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, factor)
        return {"optimizer": optimizer, "lr_scheduler": {"scheduler": scheduler, "interval": "step"}}

    def configure_model(self) -> None:
        """Shard with FSDP2 under Lightning's ``ModelParallelStrategy`` (see ``configs/trainer/fsdp.yaml``).

        Each backbone decoder layer (the classes its ``_no_split_modules`` names), each encoder
        and each connector becomes a ``fully_shard`` unit, then the whole model. With the
        strategy's default mesh ``(nodes, devices per node)`` this is hybrid sharding: shards
        within a node, replicas across nodes. Other strategies leave the model as it is.
        """
        mesh = self.device_mesh
        if mesh is None or self._sharded:
            return
        from torch.distributed.fsdp import fully_shard

        from scifm.distributed import shard_units

        units = shard_units(self.model)
        for module in list(self.model.modules()):
            if type(module) in units:
                fully_shard(module, mesh=mesh)
        fully_shard(self.model, mesh=mesh)
        self._sharded = True

    def on_save_checkpoint(self, checkpoint: dict[str, Any]) -> None:
        # settings the featurizers learned from data (a gene vocabulary), so that
        # `scifm export` rebuilds the same model from the checkpoint alone
        checkpoint[FEATURIZERS_KEY] = {m: dict(f.config()) for m, f in self.model.featurizers.items()}

    def save_pretrained(self, directory: str) -> Any:
        return self.model.save_pretrained(directory)
