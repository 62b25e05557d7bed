"""Turn a Lightning training checkpoint into a ``save_pretrained`` directory.

``scifm fit`` saves the trained model with ``save_pretrained`` when it ends; checkpoints written
during the run (``last.ckpt``, ``every_n_train_steps``) are Lightning's own format: one file
under single-device/DDP training, a directory of per-rank shards under FSDP2
(``ModelParallelStrategy``, ``save_distributed_checkpoint=True``) or DeepSpeed. ``scifm export``
reads any of them on one process, without a cluster, and writes a directory that
``scifm.load`` reads::

    scifm export outputs/quickstart_checkpoints/last.ckpt --output_dir outputs/quickstart_step400

Only tensors and plain data are read (``weights_only=True``); the model configuration comes
from the checkpoint's hyperparameters and the featurizer settings learned from data (a gene
vocabulary) from what :class:`~scifm.module.ScifmModule` stores in each checkpoint.
"""

from __future__ import annotations

import copy
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch

from scifm.config import ModelConfig

if TYPE_CHECKING:
    from scifm.model import ScifmModel

#: Checkpoint key under which ScifmModule keeps each modality's featurizer settings.
FEATURIZERS_KEY = "scifm_featurizers"
_DCP_META = "meta.pt"  # Lightning's metadata file inside a distributed checkpoint directory


def build_with_featurizers(config: ModelConfig, featurizers: Mapping[str, Mapping[str, Any]]) -> ScifmModel:
    """A fresh model for ``config`` whose featurizers use the given (learned) settings."""
    from scifm.model import ScifmModel

    config = copy.deepcopy(config)
    for enc in config.encoders:
        if enc.modality in featurizers:
            enc.featurizer = dict(featurizers[enc.modality])
    return ScifmModel.from_config(config)


def load_trained_weights(model: ScifmModel, state: Mapping[str, Any], *, source: str) -> None:
    """Load a LightningModule state dict (keys ``model.*``) into ``model``; every weight must fit."""
    weights = {k.removeprefix("model."): v for k, v in state.items() if k.startswith("model.")}
    result = model.load_state_dict(weights, strict=False)
    if result.missing_keys or result.unexpected_keys or not weights:
        raise RuntimeError(
            f"{source}: the weights do not fit a model built from its own config: "
            f"missing {result.missing_keys[:5]}, unexpected {result.unexpected_keys[:5]}"
        )


def checkpoint_kind(path: Path) -> str:
    """``file`` (single device / DDP), ``fsdp`` (torch.distributed.checkpoint) or ``deepspeed``."""
    if path.is_file():
        return "file"
    if path.is_dir():
        if (path / _DCP_META).is_file() and (path / ".metadata").is_file():
            return "fsdp"
        if (path / "latest").is_file() or (path / "checkpoint").is_dir():
            return "deepspeed"
    raise FileNotFoundError(
        f"{path} is not a Lightning checkpoint: expected a .ckpt file, a distributed checkpoint "
        f"directory (with {_DCP_META} and .metadata) or a DeepSpeed checkpoint directory"
    )


def export_checkpoint(checkpoint: str | Path, directory: str | Path) -> Path:
    """Write the model in a Lightning checkpoint to ``directory`` with ``save_pretrained``.

    Args:
        checkpoint: a ``.ckpt`` file, or the directory of a sharded FSDP2 / DeepSpeed checkpoint.
        directory: where to write the model (replaced atomically if it exists).

    Returns:
        The written directory.

    Raises:
        FileNotFoundError: ``checkpoint`` is not a checkpoint.
        ValueError: it was not written by scifm (no scifm model config in it).
        RuntimeError: its weights do not fit the model its config describes.
    """
    path = Path(checkpoint).expanduser()
    kind = checkpoint_kind(path)
    if kind == "deepspeed":
        path = _deepspeed_to_file(path)
    meta = torch.load(path / _DCP_META if kind == "fsdp" else path, map_location="cpu", weights_only=True)
    hparams = meta.get("hyper_parameters") or {}
    if "model" not in hparams:
        raise ValueError(f"{checkpoint}: no scifm model config in the checkpoint's hyper_parameters")
    model = build_with_featurizers(ModelConfig.from_dict(hparams["model"]), meta.get(FEATURIZERS_KEY, {}))
    state = _read_distributed(path, model) if kind == "fsdp" else meta["state_dict"]
    load_trained_weights(model, state, source=str(checkpoint))
    return model.save_pretrained(directory)


def _read_distributed(path: Path, model: ScifmModel) -> dict[str, torch.Tensor]:
    """Read the model weights of a torch.distributed.checkpoint directory on one process.

    The tensors are read into a state dict shaped like ``model``'s (``model.*`` keys, as
    Lightning saved them); optimizer states in the same directory are not read.
    """
    from torch.distributed.checkpoint import FileSystemReader
    from torch.distributed.checkpoint import load as dcp_load

    state = {f"model.{k}": v.clone() for k, v in model.state_dict().items()}
    reader = FileSystemReader(str(path))
    saved = set(reader.read_metadata().state_dict_metadata)
    wanted = {f"state_dict.{k}" for k in state}
    if not wanted <= saved:
        missing = sorted(k.removeprefix("state_dict.") for k in wanted - saved)
        raise RuntimeError(f"{path}: the checkpoint lacks weights of its own model config: {missing[:5]}")
    container = {"state_dict": state}
    dcp_load(container, storage_reader=reader, no_dist=True)
    return container["state_dict"]


def _deepspeed_to_file(path: Path) -> Path:
    """Consolidate a DeepSpeed ZeRO checkpoint into one file with Lightning's converter."""
    import importlib.util

    if importlib.util.find_spec("deepspeed") is None:
        raise ImportError(f"{path} is a DeepSpeed checkpoint; reading it needs `pip install deepspeed`")
    from lightning.pytorch.utilities.deepspeed import convert_zero_checkpoint_to_fp32_state_dict

    out = Path(tempfile.mkdtemp(prefix="scifm-export-")) / "consolidated.ckpt"
    convert_zero_checkpoint_to_fp32_state_dict(str(path), str(out))
    return out
