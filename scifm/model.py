"""The scifm model: domain encoders -> connectors -> soft tokens spliced into a causal LLM."""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from torch import Tensor, nn
from transformers import AutoModelForCausalLM, PreTrainedModel, PreTrainedTokenizerBase

from scifm.backbone import (
    DTYPES,
    apply_stage,
    load_backbone,
    load_tokenizer,
    prepare_tokenizer,
    weights_fingerprint,
)
from scifm.config import PLACEHOLDERS, ModelConfig
from scifm.connectors import build_connector
from scifm.modalities import build_encoder, build_featurizer, encoder_api
from scifm.splice import splice
from scifm.tokenization import Collator, PromptProcessor, Sample, TokenCount

FORMAT_VERSION = 1
CONFIG_FILE = "config.json"
MODULES_FILE = "modules.safetensors"
ADAPTER_DIR = "adapter"
BACKBONE_DIR = "backbone"
TOKENIZER_DIR = "tokenizer"


@dataclass
class ScifmOutput:
    """``loss`` is the weighted sum of ``lm_loss`` and ``head_loss`` (those present)."""

    loss: Tensor | None
    lm_loss: Tensor | None
    head_loss: Tensor | None
    logits: Tensor
    head_output: Tensor | None
    num_answer_tokens: int


class ScifmModel(nn.Module):
    """Encoders (one per modality), connectors and a causal-LM backbone.

    Build it with :meth:`from_config` (loads the pretrained backbone) or
    :meth:`from_pretrained` (a directory written by :meth:`save_pretrained`).

    Args:
        config: the model's :class:`~scifm.config.ModelConfig`.
        backbone: the HF causal LM, embeddings already sized to ``tokenizer``.
        tokenizer: its tokenizer with the placeholder tokens added.
        encoders: modality -> encoder module (see :mod:`scifm.modalities`).
    """

    def __init__(
        self,
        config: ModelConfig,
        *,
        backbone: PreTrainedModel,
        tokenizer: PreTrainedTokenizerBase,
        encoders: dict[str, nn.Module],
    ) -> None:
        super().__init__()
        self.config = config
        self.tokenizer = tokenizer
        embeddings: Any = backbone.get_input_embeddings()
        self.d_model = int(embeddings.embedding_dim)
        # A randomly initialised backbone is not saved unless trained whole (stage full): it is
        # re-created from its seed on load, and this sum checks that it came out the same.
        self.backbone_fingerprint = None if config.backbone.pretrained else weights_fingerprint(backbone)
        # HF/peft model (typed loosely: PreTrainedModel or PeftModel).
        self.backbone: Any = apply_stage(backbone, config.backbone, config.stage)
        self.encoders = nn.ModuleDict(encoders)
        self.connectors = nn.ModuleDict(
            {
                m: build_connector(config.connector, in_dim=encoder_api(enc).out_dim, out_dim=self.d_model)
                for m, enc in encoders.items()
            }
        )
        for enc_cfg in config.encoders:
            self.encoders[enc_cfg.modality].requires_grad_(enc_cfg.trainable)
        self.head: nn.Module | None = None
        if config.head.kind != "none":
            self.head = nn.Sequential(
                nn.LayerNorm(self.d_model),
                nn.Linear(self.d_model, self.d_model),
                nn.GELU(),
                nn.Linear(self.d_model, config.head.num_outputs),
            )
        self.featurizers = {e.modality: build_featurizer(e) for e in config.encoders}
        self.placeholder_ids: dict[str, int] = {
            m: _token_id(tokenizer, PLACEHOLDERS[m]) for m in self.encoders
        }

    # -- construction ----------------------------------------------------------------------
    @classmethod
    def from_config(cls, config: ModelConfig) -> ScifmModel:
        """Load the pretrained backbone named in ``config`` and build fresh encoders/connectors."""
        tokenizer = load_tokenizer(config.backbone)
        backbone = load_backbone(config.backbone, tokenizer)
        encoders: dict[str, nn.Module] = {e.modality: build_encoder(e) for e in config.encoders}
        return cls(config, backbone=backbone, tokenizer=tokenizer, encoders=encoders)

    # -- text side ---------------------------------------------------------------------------
    def processor(self) -> PromptProcessor:
        """The picklable tokenizer wrapper that expands placeholders for this model."""
        counts = {}
        for m, enc in self.encoders.items():
            if self.config.connector.kind == "resampler":
                counts[m] = TokenCount(fixed=self.config.connector.num_tokens)
            else:
                counts[m] = TokenCount(per_item=type(encoder_api(enc)).item_tokens)
        return PromptProcessor(
            self.tokenizer,
            placeholders={m: PLACEHOLDERS[m] for m in self.encoders},
            token_counts=counts,
            use_chat_template=self.config.backbone.use_chat_template,
            max_length=self.config.backbone.max_length,
        )

    def collator(self, *, for_generation: bool = False) -> Collator:
        return Collator(
            self.processor(),
            {m: type(encoder_api(enc)).collate for m, enc in self.encoders.items()},
            padding_side="left" if for_generation else "right",
            with_answers=not for_generation,
        )

    def featurize(self, modality: str, value: Any, *, record: str) -> Any:
        """Featurize one raw item (a SMILES, a Structure, ...) with this model's featurizer."""
        if modality not in self.featurizers:
            raise KeyError(f"this model has no {modality!r} encoder; it has {sorted(self.featurizers)}")
        return self.featurizers[modality](value, record=record)

    # -- forward -----------------------------------------------------------------------------
    def encode_items(self, items: dict[str, Any]) -> dict[str, tuple[Tensor, Tensor]]:
        """modality -> batched items  ==>  modality -> (soft tokens ``(M, K, d_model)``, mask ``(M, K)``)."""
        out = {}
        for modality, batch in items.items():
            tokens, mask = self.encoders[modality](batch)
            out[modality] = self.connectors[modality](tokens, mask)
        return out

    def input_embeddings(self, input_ids: Tensor, items: dict[str, Any]) -> Tensor:
        """``(B, L)`` ids + items -> ``(B, L, d_model)`` embeddings with soft tokens spliced in."""
        embeds = self.backbone.get_input_embeddings()(input_ids)
        soft = self.encode_items(items)
        features = {self.placeholder_ids[m]: v for m, v in soft.items()}
        return splice(embeds, input_ids, features, placeholder_ids=self.placeholder_ids.values())

    def forward(self, batch: dict[str, Any]) -> ScifmOutput:
        """Loss and outputs for a batch made by :meth:`collator`."""
        embeds = self.input_embeddings(batch["input_ids"], batch["items"])
        want_hidden = self.head is not None
        attention = batch["attention_mask"]
        # Positions from the mask, so left- and right-padded batches give the same result.
        position_ids = (attention.cumsum(-1) - 1).clamp(min=0)
        out = self.backbone(
            inputs_embeds=embeds,
            attention_mask=attention,
            position_ids=position_ids,
            output_hidden_states=want_hidden,
            use_cache=False,
        )
        logits = out.logits
        labels = batch["labels"]
        shift_labels = labels[:, 1:]
        num_answer = int((shift_labels != -100).sum())
        lm_loss = None
        if num_answer > 0 and self.config.lm_loss_weight > 0:
            lm_loss = nn.functional.cross_entropy(
                logits[:, :-1].reshape(-1, logits.shape[-1]).float(),
                shift_labels.reshape(-1),
                ignore_index=-100,
            )
        head_output = head_loss = None
        if self.head is not None:
            hidden = out.hidden_states[-1]
            rows = torch.arange(hidden.shape[0], device=hidden.device)
            pooled = hidden[rows, batch["last_prompt_index"]].float()
            raw = self.head(pooled)
            scale = self._target_scale(raw)
            head_output = raw if scale is None else raw * scale[1] + scale[0]
            if "target" in batch:
                target = batch["target"]
                if scale is not None:  # the loss on the standardized scale, outputs in target units
                    target = (target.float().view_as(raw) - scale[0]) / scale[1]
                head_loss = self._head_loss(raw, target)
        loss = None
        if lm_loss is not None:
            loss = self.config.lm_loss_weight * lm_loss
        if head_loss is not None:
            weighted = self.config.head.loss_weight * head_loss
            loss = weighted if loss is None else loss + weighted
        return ScifmOutput(loss, lm_loss, head_loss, logits, head_output, num_answer)

    def _target_scale(self, like: Tensor) -> tuple[Tensor, Tensor] | None:
        """(mean, std) of a standardized regression head, or None."""
        head = self.config.head
        if head.kind != "regression" or head.target_mean is None or head.target_std is None:
            return None
        mean = torch.tensor(head.target_mean, dtype=like.dtype, device=like.device)
        std = torch.tensor(head.target_std, dtype=like.dtype, device=like.device)
        return mean, std

    def set_target_stats(self, targets: Tensor) -> None:
        """Standardize the regression head with the mean and std of ``targets`` ``(N, outputs)``."""
        if targets.ndim != 2 or targets.shape[1] != self.config.head.num_outputs or targets.shape[0] < 2:
            raise ValueError(
                f"need (N >= 2, {self.config.head.num_outputs}) training targets, got {tuple(targets.shape)}"
            )
        std = targets.double().std(0)
        self.config.head.target_mean = [float(v) for v in targets.double().mean(0)]
        self.config.head.target_std = [float(v) if v > 0 else 1.0 for v in std]

    def _head_loss(self, output: Tensor, target: Tensor) -> Tensor:
        if self.config.head.kind == "classification":
            return nn.functional.cross_entropy(output, target.long())
        return nn.functional.mse_loss(output, target.float().view_as(output))

    @torch.no_grad()
    def generate_ids(self, batch: dict[str, Any], *, max_new_tokens: int = 64, **kwargs: Any) -> Tensor:
        """Greedy (by default) continuation of left-padded prompts; returns new token ids only."""
        embeds = self.input_embeddings(batch["input_ids"], batch["items"])
        kwargs.setdefault("do_sample", False)
        ids: Tensor = self.backbone.generate(
            inputs_embeds=embeds,
            attention_mask=batch["attention_mask"],
            max_new_tokens=max_new_tokens,
            pad_token_id=self.tokenizer.pad_token_id,
            eos_token_id=self.tokenizer.eos_token_id,
            suppress_tokens=list(self.placeholder_ids.values()),
            **kwargs,
        )
        return ids

    def generate(self, samples: Sequence[Sample], *, max_new_tokens: int = 64, **kwargs: Any) -> list[str]:
        batch = self.collator(for_generation=True)(samples)
        batch = move_to(batch, self.device)
        ids = self.generate_ids(batch, max_new_tokens=max_new_tokens, **kwargs)
        return [t.strip() for t in self.tokenizer.batch_decode(ids, skip_special_tokens=True)]

    @property
    def device(self) -> torch.device:
        return next(self.connectors.parameters()).device

    # -- saving / loading ----------------------------------------------------------------------
    def modules_state_dict(self) -> dict[str, Tensor]:
        """Encoder, connector and head weights (everything but the backbone)."""
        state = {}
        for prefix, module in (
            ("encoders", self.encoders),
            ("connectors", self.connectors),
            ("head", self.head),
        ):
            if module is None:
                continue
            for k, v in module.state_dict().items():
                state[f"{prefix}.{k}"] = v.detach().contiguous().cpu()
        return state

    def save_pretrained(self, directory: str | os.PathLike[str]) -> Path:
        """Write the model to ``directory`` (atomically: a temporary sibling, then a rename).

        Layout: ``config.json``; ``modules.safetensors`` (encoders, connectors, head);
        ``adapter/`` (LoRA, stage ``instruct``) or ``backbone/`` (all weights, stage ``full``);
        ``tokenizer/``. Stage ``align`` stores no backbone weights: the base model named in
        the config is loaded again. Nothing is pickled.
        """
        target = Path(directory).expanduser().resolve()
        target.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
        try:
            save_file(self.modules_state_dict(), str(tmp / MODULES_FILE))
            self.tokenizer.save_pretrained(str(tmp / TOKENIZER_DIR))
            if self.config.stage == "instruct":
                self._save_adapter(tmp / ADAPTER_DIR)
            elif self.config.stage == "full":
                _save_backbone(self.backbone, tmp / BACKBONE_DIR)
            for enc_cfg in self.config.encoders:
                # Featurizers may learn settings from data (a gene vocabulary); keep them.
                enc_cfg.featurizer = dict(self.featurizers[enc_cfg.modality].config())
            meta: dict[str, Any] = {"format_version": FORMAT_VERSION, "model": self.config.to_dict()}
            if self.backbone_fingerprint is not None and self.config.stage != "full":
                meta["backbone_fingerprint"] = self.backbone_fingerprint
            (tmp / CONFIG_FILE).write_text(json.dumps(meta, indent=2))
            if target.exists():
                old = target.with_name(f".{target.name}.old")
                shutil.rmtree(old, ignore_errors=True)
                target.rename(old)
                tmp.rename(target)
                shutil.rmtree(old)
            else:
                tmp.rename(target)
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        return target

    def _save_adapter(self, directory: Path) -> None:
        from peft import get_peft_model_state_dict

        directory.mkdir()
        state = get_peft_model_state_dict(self.backbone, save_embedding_layers=False)
        save_file(
            {k: v.detach().contiguous().cpu() for k, v in state.items()},
            str(directory / "adapter_model.safetensors"),
        )
        peft_cfg: Any = self.backbone.peft_config["default"]
        (directory / "adapter_config.json").write_text(json.dumps(peft_cfg.to_dict(), indent=2, default=list))

    def load_modules(self, directory: str | os.PathLike[str]) -> None:
        """Load encoder/connector/head weights from a saved model directory (strict)."""
        state = load_file(str(Path(directory).expanduser() / MODULES_FILE))
        missing, unexpected = _load_modules(self, state)
        if missing or unexpected:
            raise ValueError(
                f"{directory}: weights do not match this model's config (missing {missing[:5]}, "
                f"unexpected {unexpected[:5]}); was it saved with another encoder configuration?"
            )

    @staticmethod
    def saved_stage(directory: str | os.PathLike[str]) -> str:
        """The training stage recorded in a saved model directory."""
        meta = json.loads((Path(directory).expanduser() / CONFIG_FILE).read_text())
        return str(meta["model"]["stage"])

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike[str]) -> ScifmModel:
        """Load a model written by :meth:`save_pretrained`; reads only JSON and safetensors.

        Raises:
            FileNotFoundError: ``directory`` is not a saved scifm model.
            ValueError: the directory holds pickle files, or its weights do not match its config.
        """
        root = Path(directory).expanduser()
        meta_path = root / CONFIG_FILE
        if not meta_path.is_file():
            raise FileNotFoundError(f"{root} is not a saved scifm model: {CONFIG_FILE} is missing")
        pickles = [p.name for p in root.rglob("*") if p.suffix in {".bin", ".pt", ".pth", ".pkl", ".ckpt"}]
        if pickles:
            raise ValueError(
                f"{root} holds pickle files {pickles}; scifm loads only safetensors and JSON, "
                "so it refuses this directory (a pickle can run code when loaded)"
            )
        meta = json.loads(meta_path.read_text())
        if meta.get("format_version") != FORMAT_VERSION:
            raise ValueError(
                f"{root} was saved in format {meta.get('format_version')}, this scifm reads {FORMAT_VERSION}"
            )
        config = ModelConfig.from_dict(meta["model"])
        tokenizer = prepare_tokenizer(_load_tokenizer_dir(root / TOKENIZER_DIR))
        backbone: PreTrainedModel
        if config.stage == "full":
            backbone = AutoModelForCausalLM.from_pretrained(
                str(root / BACKBONE_DIR), dtype=DTYPES[config.backbone.dtype]
            )
        else:
            backbone = load_backbone(config.backbone, tokenizer)
        encoders: dict[str, nn.Module] = {e.modality: build_encoder(e) for e in config.encoders}
        model = cls(config, backbone=backbone, tokenizer=tokenizer, encoders=encoders)
        expected = meta.get("backbone_fingerprint")
        drawn = model.backbone_fingerprint
        if expected is not None and drawn is not None and abs(drawn - expected) > 1e-6 * abs(expected):
            raise ValueError(
                f"{root}: its randomly initialised backbone (init_seed {config.backbone.init_seed}) "
                f"came out differently here (weight sum {drawn!r}, saved {expected!r}); other "
                "torch/transformers versions initialise differently"
            )
        model.load_modules(root)
        if config.stage == "instruct":
            from peft import set_peft_model_state_dict

            adapter = load_file(str(root / ADAPTER_DIR / "adapter_model.safetensors"))
            result: Any = set_peft_model_state_dict(model.backbone, adapter)
            if result.unexpected_keys:
                raise ValueError(f"{root}: adapter weights do not match: {result.unexpected_keys[:5]}")
        model.eval()
        return model


def _token_id(tokenizer: PreTrainedTokenizerBase, token: str) -> int:
    token_id = tokenizer.convert_tokens_to_ids(token)
    assert isinstance(token_id, int)
    return token_id


def _load_tokenizer_dir(path: Path) -> PreTrainedTokenizerBase:
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(str(path))


def _load_modules(model: ScifmModel, state: dict[str, Tensor]) -> tuple[list[str], list[str]]:
    missing: list[str] = []
    unexpected: list[str] = []
    for prefix, module in (
        ("encoders", model.encoders),
        ("connectors", model.connectors),
        ("head", model.head),
    ):
        part = {k[len(prefix) + 1 :]: v for k, v in state.items() if k.startswith(prefix + ".")}
        if module is None:
            unexpected += [f"{prefix}.{k}" for k in part]
            continue
        try:
            result = module.load_state_dict(part, strict=False)
        except RuntimeError as exc:  # shape mismatch
            raise ValueError(f"weights do not fit the configured {prefix}: {exc}") from exc
        missing += [f"{prefix}.{k}" for k in result.missing_keys]
        unexpected += [f"{prefix}.{k}" for k in result.unexpected_keys]
    return missing, unexpected


def _save_backbone(backbone: nn.Module, directory: Path) -> None:
    """Save all backbone weights as safetensors + its HF config.

    ``save_pretrained`` refuses models loaded from GGUF, so the state dict is written directly;
    the tied ``lm_head.weight`` is left out (transformers ties it again on load).
    """
    assert isinstance(backbone, PreTrainedModel)
    directory.mkdir()
    state = backbone.state_dict()
    if backbone.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    save_file(
        {k: v.detach().contiguous().cpu() for k, v in state.items()}, str(directory / "model.safetensors")
    )
    backbone.config.save_pretrained(str(directory))
    if backbone.generation_config is not None:
        backbone.generation_config.save_pretrained(str(directory))


def move_to(batch: dict[str, Any], device: torch.device) -> dict[str, Any]:
    """Move tensors (and PyG batches, anything with ``.to``) of a batch to ``device``."""
    out: dict[str, Any] = {}
    for k, v in batch.items():
        if isinstance(v, dict):
            out[k] = move_to(v, device)
        elif hasattr(v, "to") and not isinstance(v, (str, list)):
            out[k] = v.to(device)
        else:
            out[k] = v
    return out
