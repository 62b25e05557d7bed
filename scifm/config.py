"""Typed configuration of a scifm model.

The YAML files in ``configs/`` mirror these dataclasses field for field; ``config.json`` in a
saved model directory is ``dataclasses.asdict`` of :class:`ModelConfig`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any, Literal

Stage = Literal["align", "instruct", "full"]
Modality = Literal["molecule", "crystal", "cell"]

#: The placeholder written in prompts for one item of each modality.
PLACEHOLDERS: dict[str, str] = {"molecule": "<mol>", "crystal": "<crystal>", "cell": "<cell>"}


@dataclass
class BackboneConfig:
    """The pretrained causal LLM and how it is adapted."""

    # Hub id, local directory, or directory holding a GGUF file (see ``gguf_file``).
    name: str = "HuggingFaceTB/SmolLM2-135M-Instruct"
    # File name of a GGUF checkpoint inside ``name``; None for ordinary HF weights.
    gguf_file: str | None = None
    # Weight dtype of the backbone; encoders and connectors stay in fp32.
    dtype: Literal["float32", "bfloat16"] = "float32"
    # Recompute decoder activations in backward to save memory.
    gradient_checkpointing: bool = False
    # LoRA rank, scaling alpha and dropout, used by the ``instruct`` stage.
    lora_r: int = 16
    lora_alpha: int = 32
    lora_dropout: float = 0.05
    # Module names (or "all-linear") that receive LoRA adapters.
    lora_target_modules: list[str] | str = "all-linear"
    # Wrap user prompts in the backbone's chat template when the tokenizer has one.
    use_chat_template: bool = True
    # Longest tokenized sequence (prompt + placeholders + answer); see scifm.tokenization.
    max_length: int = 512
    # False: the same architecture with random weights (seeded by ``init_seed``), e.g. to
    # measure what pretraining contributes. The tokenizer is still the pretrained one.
    pretrained: bool = True
    init_seed: int = 0

    def __post_init__(self) -> None:
        if self.lora_r <= 0 or self.lora_alpha <= 0:
            raise ValueError(f"lora_r and lora_alpha must be positive, got {self.lora_r}, {self.lora_alpha}")
        if not 0.0 <= self.lora_dropout < 1.0:
            raise ValueError(f"lora_dropout must lie in [0, 1), got {self.lora_dropout}")
        if self.max_length < 8:
            raise ValueError(f"max_length must be at least 8, got {self.max_length}")


@dataclass
class ConnectorConfig:
    """Maps encoder tokens ``(B, N, d_enc)`` to LLM soft tokens ``(B, K, d_model)``."""

    # "mlp": LLaVA projector, one soft token per encoder token (K = N, e.g. one per atom).
    # "resampler": K learned queries cross-attending to the encoder tokens (K = num_tokens).
    kind: Literal["mlp", "resampler"] = "resampler"
    # K for the resampler; ignored by "mlp".
    num_tokens: int = 8
    # Width of the resampler's attention / the MLP's hidden layer; None = the LLM width.
    hidden_dim: int | None = None
    # Attention heads and layers of the resampler.
    num_heads: int = 4
    num_layers: int = 1

    def __post_init__(self) -> None:
        if self.num_tokens <= 0:
            raise ValueError(f"connector.num_tokens must be positive, got {self.num_tokens}")
        if self.hidden_dim is not None and self.hidden_dim % self.num_heads != 0:
            raise ValueError(
                f"connector.hidden_dim ({self.hidden_dim}) must be divisible by num_heads ({self.num_heads})"
            )


@dataclass
class EncoderConfig:
    """One modality's featurizer and encoder."""

    # Which modality this encoder reads; sets the placeholder (<mol>, <crystal>, <cell>).
    modality: Modality = "molecule"
    # Encoder architecture, resolved by scifm.modalities ("gine" for molecules).
    kind: str = "gine"
    # Keyword arguments of the encoder class (hidden_dim, num_layers, ...).
    params: dict[str, Any] = field(default_factory=dict)
    # Keyword arguments of the featurizer class (largest_fragment, cutoff, ...).
    featurizer: dict[str, Any] = field(default_factory=dict)
    # Train the encoder's weights (False keeps a pretrained encoder frozen).
    trainable: bool = True


@dataclass
class HeadConfig:
    """An optional numeric head on the hidden state of the last prompt token."""

    kind: Literal["none", "regression", "classification"] = "none"
    # Regression targets, or classes for classification.
    num_outputs: int = 1
    # Weight of the head's loss relative to the language-model loss.
    loss_weight: float = 1.0
    # Names of the outputs (target columns or class labels), kept for predict().
    labels: list[str] = field(default_factory=list)
    # Regression: learn (target - mean) / std, with mean and std of the training targets
    # (filled in when fit starts and saved with the model); outputs come back in target units.
    standardize: bool = False
    target_mean: list[float] | None = None
    target_std: list[float] | None = None

    def __post_init__(self) -> None:
        if self.kind != "none" and self.num_outputs <= 0:
            raise ValueError(f"head.num_outputs must be positive, got {self.num_outputs}")
        if self.labels and len(self.labels) != self.num_outputs:
            raise ValueError(
                f"head.labels has {len(self.labels)} names but num_outputs is {self.num_outputs}"
            )
        for name in ("target_mean", "target_std"):
            stats = getattr(self, name)
            if stats is not None and len(stats) != self.num_outputs:
                raise ValueError(f"head.{name} has {len(stats)} values but num_outputs is {self.num_outputs}")
        if self.target_std is not None and not all(v > 0 for v in self.target_std):
            raise ValueError(f"head.target_std must be positive, got {self.target_std}")


@dataclass
class ModelConfig:
    """Everything needed to rebuild a scifm model (written to ``config.json``)."""

    backbone: BackboneConfig = field(default_factory=BackboneConfig)
    connector: ConnectorConfig = field(default_factory=ConnectorConfig)
    encoders: list[EncoderConfig] = field(default_factory=lambda: [EncoderConfig()])
    head: HeadConfig = field(default_factory=HeadConfig)
    # align: encoder + connector train, LLM frozen; instruct: + LoRA; full: everything.
    stage: Stage = "instruct"
    # Weight of the next-token loss on answers (0 trains only the head).
    lm_loss_weight: float = 1.0

    def __post_init__(self) -> None:
        seen = [e.modality for e in self.encoders]
        if len(set(seen)) != len(seen):
            raise ValueError(f"one encoder per modality, got modalities {seen}")
        if self.lm_loss_weight < 0:
            raise ValueError(f"lm_loss_weight must be >= 0, got {self.lm_loss_weight}")
        if self.lm_loss_weight == 0 and self.head.kind == "none":
            raise ValueError("lm_loss_weight is 0 and there is no head: nothing would be trained")

    def encoder_for(self, modality: str) -> EncoderConfig:
        for enc in self.encoders:
            if enc.modality == modality:
                return enc
        raise KeyError(
            f"this model has no {modality!r} encoder; it has {[e.modality for e in self.encoders]}"
        )

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> ModelConfig:
        """Rebuild from :meth:`to_dict` output; unknown keys are an error, not ignored."""
        return cls(
            backbone=BackboneConfig(**data["backbone"]),
            connector=ConnectorConfig(**data["connector"]),
            encoders=[EncoderConfig(**e) for e in data["encoders"]],
            head=HeadConfig(**data["head"]),
            stage=data["stage"],
            lm_loss_weight=data["lm_loss_weight"],
        )
