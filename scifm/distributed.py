"""Distributed training helpers: which modules FSDP shards (read from the model, not guessed
from its name), and gathering full weights from a sharded run so that ``save_pretrained``
works as usual.

Lightning is the distributed engine; nothing here launches processes.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from lightning.pytorch.strategies import DeepSpeedStrategy, FSDPStrategy, ModelParallelStrategy, Strategy
from torch import nn

if TYPE_CHECKING:
    from scifm.model import ScifmModel


def shard_units(model: ScifmModel) -> set[type[nn.Module]]:
    """Module classes to shard as FSDP units: the backbone's decoder layers, the encoders, the
    connectors.

    Decoder layers are the classes a Hugging Face model lists in ``_no_split_modules``
    (``LlamaDecoderLayer``, ``GPT2Block``, ...), so no model name is guessed.

    Raises:
        ValueError: the backbone declares no ``_no_split_modules``.
    """
    from transformers import PreTrainedModel

    names: set[str] = set()
    for m in model.backbone.modules():
        if isinstance(m, PreTrainedModel):
            names |= set(m._no_split_modules or [])
    decoder = {type(m) for m in model.backbone.modules() if type(m).__name__ in names}
    if not decoder:
        raise ValueError("found no decoder layer class to shard: the backbone declares no _no_split_modules")
    encoders = {type(m) for m in model.encoders.values()}
    connectors = {type(m) for m in model.connectors.values()}
    return decoder | encoders | connectors


def is_sharded(strategy: Strategy) -> bool:
    """True when parameters are split across ranks, so weights must be gathered to save them."""
    return isinstance(strategy, (FSDPStrategy, ModelParallelStrategy, DeepSpeedStrategy))


def save_pretrained_from(trainer: Any, module: Any, directory: str) -> Any:
    """Save a trained :class:`~scifm.module.ScifmModule` with ``save_pretrained``, whatever the strategy.

    Call it on every rank. Under FSDP or DeepSpeed the full weights are gathered first (a
    collective), loaded into a fresh single-device model on rank 0 and saved from there, so the
    directory loads with ``scifm.load`` like any other. Returns the directory on rank 0, else None.
    """
    from scifm.export import build_with_featurizers, load_trained_weights

    if is_sharded(trainer.strategy):
        if isinstance(trainer.strategy, ModelParallelStrategy):
            from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict

            options = StateDictOptions(full_state_dict=True, cpu_offload=True)
            state = get_model_state_dict(module, options=options)  # collective
        else:
            state = trainer.strategy.lightning_module_state_dict()
        if not trainer.is_global_zero:
            return None
        # featurizer settings learned from data (gene lists) come from the trained module
        featurizers = {m: f.config() for m, f in module.model.featurizers.items()}
        fresh = build_with_featurizers(module.model.config, featurizers)
        load_trained_weights(fresh, state, source="the gathered weights")
        return fresh.save_pretrained(directory)
    if not trainer.is_global_zero:
        return None
    return module.save_pretrained(directory)
