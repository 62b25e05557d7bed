"""The LightningModule that trains a :class:`~scifm.model.ScifmModel`."""

from __future__ import annotations

import math
import time
from dataclasses import asdict, dataclass
from typing import Any

import lightning as L
import torch

from scifm.config import ModelConfig
from scifm.model import ScifmModel


@dataclass
class OptimConfig:
    """AdamW with linear warmup and cosine decay to ``min_lr_ratio * lr``."""

    lr: float = 1e-4
    weight_decay: float = 0.01
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_steps: int = 10
    min_lr_ratio: float = 0.1

    def __post_init__(self) -> None:
        if self.lr <= 0:
            raise ValueError(f"optim.lr must be positive, got {self.lr}")
        if self.warmup_steps < 0:
            raise ValueError(f"optim.warmup_steps must be >= 0, got {self.warmup_steps}")
        if not 0.0 <= self.min_lr_ratio <= 1.0:
            raise ValueError(f"optim.min_lr_ratio must lie in [0, 1], got {self.min_lr_ratio}")


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

    Logged: ``train/loss``, ``train/lm_loss``, ``train/perplexity``, ``train/head_loss``,
    ``train/lr``, ``train/tokens_per_s``, and the same losses under ``val/`` and ``test/``.
    Hyperparameters are kept as plain data so checkpoints load under ``weights_only=True``.
    """

    def __init__(
        self,
        model: ModelConfig | None = None,
        optim: OptimConfig | None = None,
        init_from: str | None = None,
    ) -> None:
        super().__init__()
        self.model_config = model or ModelConfig()
        self.optim_config = optim or OptimConfig()
        self.save_hyperparameters(
            {"model": self.model_config.to_dict(), "optim": asdict(self.optim_config), "init_from": init_from}
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

    # -- steps ---------------------------------------------------------------------------------
    def _shared_step(self, batch: dict[str, Any], split: str) -> torch.Tensor:
        out = self.model(batch)
        if out.loss is None:
            raise RuntimeError("batch had neither answer tokens nor head targets: nothing to learn from")
        bs = batch["input_ids"].shape[0]
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
        return out.loss

    def on_train_batch_start(self, batch: Any, batch_idx: int) -> None:
        self._step_start = time.perf_counter()

    def training_step(self, batch: dict[str, Any], batch_idx: int) -> torch.Tensor:
        loss = self._shared_step(batch, "train")
        self.log("train/lr", self.trainer.optimizers[0].param_groups[0]["lr"], on_step=True, batch_size=1)
        return loss

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
        """Generated answers (and head outputs) for a batch of prompts, one dict per sample."""
        ids = self.model.generate_ids(batch, max_new_tokens=self.model_config.backbone.max_length // 4)
        texts = [t.strip() for t in self.model.tokenizer.batch_decode(ids, skip_special_tokens=True)]
        rows: list[dict[str, Any]] = [
            {"id": i, "generated": t} for i, t in zip(batch["ids"], texts, strict=True)
        ]
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

    def save_pretrained(self, directory: str) -> Any:
        return self.model.save_pretrained(directory)
