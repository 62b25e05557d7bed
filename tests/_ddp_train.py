"""Train a tiny model on 1 or N CPU processes (DDP, gloo); used by test_distributed.py.

Run as a script, since Lightning's DDP launcher starts the other ranks by running it again.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import lightning as L
import torch
from safetensors.torch import save_file

sys.path.insert(0, str(Path(__file__).parent))
from conftest import tiny_config

from scifm.data_modules.molecule import MoleculeDataModule
from scifm.model import ScifmModel
from scifm.module import OptimConfig, ScifmModule


def _strategy(name: str) -> object:
    if name == "fsdp":  # FSDP2 through configure_model; runs on CPU with gloo
        from lightning.pytorch.strategies import ModelParallelStrategy

        return ModelParallelStrategy()
    return name


def _inject_nan(module: ScifmModule, trainer: L.Trainer, *, step: int) -> None:
    """Make the loss NaN on the last rank only, at one training step (a numeric fault on one GPU)."""
    forward = module.model.forward

    def faulty(batch: dict) -> object:
        out = forward(batch)
        if module.training and trainer.global_step == step and trainer.global_rank == trainer.world_size - 1:
            out.loss = out.loss * float("nan")
        return out

    module.model.forward = faulty  # type: ignore[method-assign]


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--backbone", required=True)
    ap.add_argument("--data", required=True)
    ap.add_argument("--devices", type=int, required=True)
    ap.add_argument("--batch_size", type=int, required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--strategy", default="ddp")
    ap.add_argument("--save_dir", default=None)
    ap.add_argument("--ckpt", default=None, help="also save a Lightning checkpoint here (sharded under fsdp)")
    ap.add_argument(
        "--nan_at_step", type=int, default=None, help="make the last rank's loss NaN at this step"
    )
    args = ap.parse_args()

    L.seed_everything(0)
    torch.use_deterministic_algorithms(True)
    cfg = tiny_config(Path(args.backbone), head="regression")
    module = ScifmModule(cfg, OptimConfig(lr=1e-2, warmup_steps=0))
    template = {"prompt": "Is <mol> soluble?", "answer": "{label}", "targets": ["expt"]}
    data = MoleculeDataModule(
        args.data, template=template, fractions=(1.0, 0.0, 0.0), batch_size=args.batch_size, seed=3
    )
    trainer = L.Trainer(
        accelerator="cpu",
        devices=args.devices,
        strategy=_strategy(args.strategy) if args.devices > 1 else "auto",
        max_steps=4,
        use_distributed_sampler=False,
        logger=False,
        enable_checkpointing=False,
        enable_progress_bar=False,
        enable_model_summary=False,
        limit_val_batches=0,
    )
    trainable = {n for n, p in module.model.named_parameters() if p.requires_grad}
    if args.nan_at_step is not None:
        _inject_nan(module, trainer, step=args.nan_at_step)
    trainer.fit(module, datamodule=data)
    if args.ckpt:
        trainer.save_checkpoint(args.ckpt)  # every rank: each writes its shard under FSDP2
    if args.save_dir:
        from scifm.distributed import save_pretrained_from

        save_pretrained_from(trainer, module, args.save_dir)  # every rank: gathers sharded weights
    if trainer.is_global_zero:
        model = ScifmModel.from_pretrained(args.save_dir) if args.save_dir else module.model
        trained = {n: p.detach().contiguous() for n, p in model.named_parameters() if n in trainable}
        save_file(trained, args.out)
        # loss of the final model on the whole training set, on one process
        model.eval()
        collate = model.collator()
        batch = collate(data.datasets["train"].samples)
        with torch.no_grad():
            loss = model(batch).loss
        assert loss is not None
        Path(args.out).with_suffix(".json").write_text(json.dumps({"loss": float(loss)}))


if __name__ == "__main__":
    main()
