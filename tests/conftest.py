"""Fixtures built in code: tiny random HF backbones (``scifm.testing``), small configs, a
training loop. Nothing is downloaded; files only under pytest's temporary directories."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
import torch

from scifm.config import BackboneConfig, ConnectorConfig, EncoderConfig, HeadConfig, ModelConfig
from scifm.testing import make_backbone


@pytest.fixture(scope="session")
def llama_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_backbone(tmp_path_factory.mktemp("tiny-llama"), kind="llama")


@pytest.fixture(scope="session")
def gpt2_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_backbone(tmp_path_factory.mktemp("tiny-gpt2"), kind="gpt2")


def tiny_config(
    backbone_dir: Path,
    *,
    stage: str = "instruct",
    connector: str = "resampler",
    head: str = "none",
    num_tokens: int = 4,
) -> ModelConfig:
    return ModelConfig(
        backbone=BackboneConfig(
            name=str(backbone_dir), lora_r=4, lora_alpha=8, lora_dropout=0.0, max_length=96
        ),
        connector=ConnectorConfig(kind=connector, num_tokens=num_tokens, num_heads=2),  # type: ignore[arg-type]
        encoders=[
            EncoderConfig(modality="molecule", kind="gine", params={"hidden_dim": 16, "num_layers": 2})
        ],
        head=HeadConfig(kind=head, num_outputs=1) if head != "none" else HeadConfig(),  # type: ignore[arg-type]
        stage=stage,  # type: ignore[arg-type]
    )


SMILES = ["CCO", "c1ccccc1O", "C[N+](C)(C)C.[Cl-]"]


@pytest.fixture(autouse=True, scope="session")
def _featurization_cache_in_tmp(tmp_path_factory: pytest.TempPathFactory) -> None:
    """Keep the featurization cache of test runs out of the user's ~/.cache."""
    import os

    os.environ["SCIFM_CACHE"] = str(tmp_path_factory.mktemp("scifm-cache"))


def train_steps(model: torch.nn.Module, batches: list[dict], *, steps: int, lr: float) -> list[float]:
    """``steps`` AdamW steps over ``batches`` (cycled); returns the losses; leaves the model in eval mode."""
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    losses = []
    for step in range(steps):
        out = model(batches[step % len(batches)])
        assert out.loss is not None
        opt.zero_grad()
        out.loss.backward()
        opt.step()
        losses.append(out.loss.item())
    model.eval()
    return losses


#: A slice of FreeSolv (SMILES, hydration free energy in kcal/mol) for CLI-level tests.
FREESOLV_ROWS = [
    ("CCO", -5.0),
    ("c1ccccc1", -0.87),
    ("c1ccccc1O", -6.6),
    ("CC(=O)O", -6.69),
    ("C1CCCCC1", 1.23),
    ("CCCC", 2.1),
    ("c1ccncc1", -4.69),
    ("CC(C)O", -4.74),
    ("CCN", -4.5),
    ("ClC(Cl)Cl", -1.08),
]


#: Gene names of the synthetic cell data sets in the tests.
CELL_GENES = tuple(f"G{i}" for i in range(50))


def cell_config(
    backbone: Path,
    *,
    kind: str = "mlp",
    genes: Sequence[str] = CELL_GENES,
    head: HeadConfig | None = None,
    connector: str = "resampler",
    extra: list[EncoderConfig] | None = None,
    stage: str = "instruct",
    featurizer: dict[str, Any] | None = None,
    lm_loss_weight: float = 1.0,
) -> ModelConfig:
    """A tiny model config with a cell encoder (``mlp`` or ``transformer``) over ``genes``."""
    params: dict[str, Any] = {"num_genes": len(genes), "hidden_dim": 16}
    params.update({"num_tokens": 3} if kind == "mlp" else {"top_k": 6, "num_heads": 2, "num_layers": 1})
    feat: dict[str, Any] = {"genes": list(genes), "data": "counts", **(featurizer or {})}
    return ModelConfig(
        backbone=BackboneConfig(name=str(backbone), lora_r=4, lora_alpha=8, lora_dropout=0.0, max_length=96),
        connector=ConnectorConfig(kind=connector, num_tokens=3, num_heads=2),  # type: ignore[arg-type]
        encoders=[EncoderConfig(modality="cell", kind=kind, params=params, featurizer=feat), *(extra or [])],
        head=head or HeadConfig(),
        stage=stage,  # type: ignore[arg-type]
        lm_loss_weight=lm_loss_weight,
    )
