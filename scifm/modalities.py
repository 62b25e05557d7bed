"""Resolve an :class:`~scifm.config.EncoderConfig` to its featurizer and encoder classes.

Every encoder module follows one protocol: ``out_dim`` (its token width), ``forward(batch) ->
(tokens (B, N, out_dim), mask (B, N))``, and the static methods ``collate(items)`` and
``item_tokens(item)``. Every featurizer is ``featurizer(value, *, record=...) -> item`` and raises
:class:`scifm.InvalidInputError` on a bad value.
"""

from __future__ import annotations

import importlib
from dataclasses import dataclass
from typing import Any, Protocol, cast

from torch import Tensor, nn

from scifm.config import EncoderConfig
from scifm.errors import MissingExtraError


class EncoderModule(Protocol):
    """What scifm needs of an encoder module (see the module docstring)."""

    out_dim: int

    @staticmethod
    def item_tokens(item: Any) -> int: ...

    @staticmethod
    def collate(items: list[Any]) -> Any: ...

    def __call__(self, batch: Any) -> tuple[Tensor, Tensor]: ...


def encoder_api(module: nn.Module) -> EncoderModule:
    """View an encoder ``nn.Module`` through the :class:`EncoderModule` protocol (for typing)."""
    return cast(EncoderModule, module)


@dataclass(frozen=True)
class _Entry:
    module: str
    encoder: str
    featurizer: str
    extra: str


#: (modality, kind) -> where the classes live and which extra installs their dependencies.
REGISTRY: dict[tuple[str, str], _Entry] = {
    ("molecule", "gine"): _Entry("scifm.encoders.molecule", "GINEEncoder", "MoleculeFeaturizer", "molecule"),
    ("crystal", "cgcnn"): _Entry("scifm.encoders.crystal", "CGCNNEncoder", "CrystalFeaturizer", "crystal"),
    ("crystal", "chgnet"): _Entry("scifm.encoders.crystal", "CHGNetEncoder", "CHGNetFeaturizer", "crystal"),
    ("cell", "mlp"): _Entry("scifm.encoders.cell", "CellMLPEncoder", "CellFeaturizer", "cell"),
    ("cell", "transformer"): _Entry(
        "scifm.encoders.cell", "CellTransformerEncoder", "CellFeaturizer", "cell"
    ),
}


def _entry(cfg: EncoderConfig) -> _Entry:
    try:
        return REGISTRY[(cfg.modality, cfg.kind)]
    except KeyError:
        valid = sorted(k for m, k in REGISTRY if m == cfg.modality)
        raise ValueError(f"unknown {cfg.modality} encoder kind {cfg.kind!r}; valid: {valid}") from None


def _load(cfg: EncoderConfig, attr: str) -> Any:
    entry = _entry(cfg)
    try:
        module = importlib.import_module(entry.module)
    except ImportError as exc:
        if exc.name is None or exc.name.startswith("scifm"):
            raise
        raise MissingExtraError(exc.name, entry.extra) from exc
    return getattr(module, attr)


def build_encoder(cfg: EncoderConfig) -> nn.Module:
    """Instantiate the encoder for ``cfg`` with ``cfg.params`` as keyword arguments."""
    return _load(cfg, _entry(cfg).encoder)(**cfg.params)  # type: ignore[no-any-return]


def build_featurizer(cfg: EncoderConfig) -> Any:
    """Instantiate the featurizer for ``cfg`` with ``cfg.featurizer`` as keyword arguments."""
    return _load(cfg, _entry(cfg).featurizer)(**cfg.featurizer)
