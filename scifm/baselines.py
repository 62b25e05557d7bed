"""Baselines to compare a scifm model against, on the very same samples and splits.

- :func:`morgan_fingerprints`: RDKit Morgan (ECFP-like) bit vectors, for scikit-learn models
  (e.g. a random forest).
- :func:`expression_matrix`: the model's own cell featurization (gene order, normalisation) as a
  plain matrix, for e.g. logistic regression on the genes.
- :class:`EncoderHead` / :func:`fit_encoder_head`: a scifm domain encoder (GINE, CGCNN, cell
  MLP, ...) with a mean-pool and an MLP head, trained alone, without the LLM: what the encoder
  achieves by itself. Trained on the featurized items of a data module's samples, with the
  epoch of lowest validation loss kept.
"""

from __future__ import annotations

import copy
import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
from torch import Tensor, nn

from scifm.config import EncoderConfig
from scifm.modalities import build_encoder, encoder_api
from scifm.tokenization import Sample

Task = Literal["regression", "classification"]


def morgan_fingerprints(smiles: Sequence[Any], *, radius: int = 2, n_bits: int = 2048) -> np.ndarray:
    """``(len(smiles), n_bits)`` uint8 Morgan fingerprints (radius 2 = ECFP4) of SMILES or RDKit Mols.

    Raises:
        scifm.InvalidInputError: a SMILES RDKit cannot read (named by its index).
    """
    from rdkit.Chem import rdFingerprintGenerator

    from scifm.encoders.molecule import parse_molecule

    generator = rdFingerprintGenerator.GetMorganGenerator(radius=radius, fpSize=n_bits)
    out = np.zeros((len(smiles), n_bits), dtype=np.uint8)
    for i, s in enumerate(smiles):
        out[i] = generator.GetFingerprintAsNumPy(parse_molecule(s, record=f"smiles[{i}]"))
    return out


def expression_matrix(samples: Sequence[Sample]) -> np.ndarray:
    """``(cells, genes)`` float32 matrix of the first ``<cell>`` item of each sample, as the
    model's cell featurizer produced it (its gene vocabulary, normalisation and log1p)."""
    return np.stack([np.asarray(s.items["cell"][0].values, dtype=np.float32).reshape(-1) for s in samples])


@dataclass
class HeadTraining:
    """How :func:`fit_encoder_head` trains."""

    epochs: int = 100
    batch_size: int = 32
    lr: float = 1e-3
    weight_decay: float = 1e-4
    patience: int = 20
    """Stop after this many epochs without a lower validation loss."""
    seed: int = 0


class EncoderHead(nn.Module):
    """A scifm encoder, a masked mean over its tokens, and an MLP to ``num_outputs``.

    For regression the targets are standardised with the training mean/std, and
    :meth:`predict` returns values in the original units.
    """

    def __init__(self, encoder: EncoderConfig, *, num_outputs: int, task: Task) -> None:
        super().__init__()
        self.encoder_config = encoder
        self.encoder = build_encoder(encoder)
        width = encoder_api(self.encoder).out_dim
        self.head = nn.Sequential(
            nn.LayerNorm(width), nn.Linear(width, width), nn.GELU(), nn.Linear(width, num_outputs)
        )
        self.task = task
        self.register_buffer("mean", torch.zeros(num_outputs))
        self.register_buffer("std", torch.ones(num_outputs))

    def forward(self, batch: Any) -> Tensor:
        tokens, mask = self.encoder(batch)
        weights = mask.to(tokens.dtype).unsqueeze(-1)
        pooled = (tokens * weights).sum(1) / weights.sum(1).clamp(min=1.0)
        return self.head(pooled)  # type: ignore[no-any-return]

    def collate(self, samples: Sequence[Sample], modality: str) -> Any:
        return encoder_api(self.encoder).collate([s.items[modality][0] for s in samples])

    @torch.no_grad()
    def predict(self, samples: Sequence[Sample], *, batch_size: int = 256) -> np.ndarray:
        """Regression: ``(N, num_outputs)`` values; classification: ``(N, classes)`` logits."""
        self.eval()
        modality = self.encoder_config.modality
        outs = []
        for i in range(0, len(samples), batch_size):
            out = self(self.collate(samples[i : i + batch_size], modality))
            if self.task == "regression":
                out = out * self.std + self.mean
            outs.append(out)
        return torch.cat(outs).numpy()


def _targets(samples: Sequence[Sample], task: Task) -> Tensor:
    values = [s.target for s in samples]
    if any(v is None for v in values):
        raise ValueError("every sample needs a target (a template with `targets:` or `label:`)")
    if task == "classification":
        return torch.tensor(values, dtype=torch.long)
    return torch.tensor(values, dtype=torch.float32).reshape(len(samples), -1)


def fit_encoder_head(
    encoder: EncoderConfig,
    train: Sequence[Sample],
    val: Sequence[Sample],
    *,
    task: Task,
    num_outputs: int,
    training: HeadTraining | None = None,
) -> tuple[EncoderHead, list[dict[str, float]]]:
    """Train :class:`EncoderHead` on ``train``, keep the weights of the best ``val`` epoch.

    Returns:
        The trained model (best epoch) and the per-epoch history (``epoch``, ``train_loss``,
        ``val_loss``).
    """
    cfg = training or HeadTraining()
    if not train or not val:
        raise ValueError("fit_encoder_head needs training and validation samples")
    random.seed(cfg.seed)
    np.random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    model = EncoderHead(encoder, num_outputs=num_outputs, task=task)
    y_train, y_val = _targets(train, task), _targets(val, task)
    mean, std = torch.zeros(num_outputs), torch.ones(num_outputs)
    if task == "regression":
        mean, std = y_train.mean(0), y_train.std(0).clamp(min=1e-6)
        model.mean, model.std = mean, std
    loss_fn: nn.Module = nn.CrossEntropyLoss() if task == "classification" else nn.MSELoss()

    def scaled(y: Tensor) -> Tensor:
        return (y - mean) / std if task == "regression" else y

    modality = encoder.modality
    optimizer = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    val_batch = model.collate(val, modality)
    best = (float("inf"), copy.deepcopy(model.state_dict()))
    history: list[dict[str, float]] = []
    since_best = 0
    generator = torch.Generator().manual_seed(cfg.seed)
    for epoch in range(cfg.epochs):
        model.train()
        order = torch.randperm(len(train), generator=generator).tolist()
        total = 0.0
        for i in range(0, len(order), cfg.batch_size):
            idx = order[i : i + cfg.batch_size]
            loss = loss_fn(model(model.collate([train[j] for j in idx], modality)), scaled(y_train[idx]))
            optimizer.zero_grad()
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), 1.0)
            optimizer.step()
            total += float(loss.detach()) * len(idx)
        model.eval()
        with torch.no_grad():
            val_loss = float(loss_fn(model(val_batch), scaled(y_val)))
        history.append({"epoch": epoch, "train_loss": total / len(train), "val_loss": val_loss})
        if val_loss < best[0]:
            best, since_best = (val_loss, copy.deepcopy(model.state_dict())), 0
        else:
            since_best += 1
            if since_best >= cfg.patience:
                break
    model.load_state_dict(best[1])
    model.eval()
    return model, history
