"""Python API: ``scifm.load(dir).generate / predict / embed`` on raw SMILES, structures and cells."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from scifm.modalities import encoder_api
from scifm.model import ScifmModel, move_to
from scifm.tokenization import Sample

#: Keyword argument of the predict API -> modality.
_ITEM_ARGS = {"molecules": "molecule", "crystals": "crystal", "cells": "cell"}


class Predictor:
    """Inference on a trained model; featurizes raw inputs with the model's own featurizers.

    Items are given per prompt: ``molecules=["CCO", "c1ccccc1"]`` for two prompts with one
    ``<mol>`` each, ``molecules=[["CCO", "CC(=O)O"]]`` for one prompt with two, ``None`` in
    the list for a prompt without that placeholder. Molecules are SMILES strings or RDKit
    Mols. A bad item raises :class:`scifm.InvalidInputError` naming it (``molecules[3]``).

    Args:
        model: a :class:`~scifm.model.ScifmModel` (``scifm.load`` builds one).
        batch_size: prompts per forward pass (default: 8).
        device: where to run (default: CUDA when available, else CPU).
    """

    def __init__(
        self, model: ScifmModel, *, batch_size: int = 8, device: str | torch.device | None = None
    ) -> None:
        self.model = model.eval()
        self.batch_size = batch_size
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model.to(self.device)

    # -- inputs --------------------------------------------------------------------------------
    def _samples(self, prompts: Sequence[str], item_args: dict[str, Any]) -> list[Sample]:
        samples = [Sample(id=f"prompts[{i}]", prompt=p) for i, p in enumerate(prompts)]
        for arg, values in item_args.items():
            if values is None:
                continue
            modality = _ITEM_ARGS[arg]
            values = self._rows(modality, values)
            if len(values) != len(prompts):
                raise ValueError(
                    f"{len(prompts)} prompts but {len(values)} entries in {arg}=; give one per prompt"
                )
            for i, (sample, value) in enumerate(zip(samples, values, strict=True)):
                if value is None:
                    continue
                group = list(value) if isinstance(value, (list, tuple)) else [value]
                sample.items[modality] = [
                    self.model.featurize(
                        modality, v, record=f"{arg}[{i}]" + (f"[{k}]" if len(group) > 1 else "")
                    )
                    for k, v in enumerate(group)
                ]
        processor = self.model.processor()
        for s in samples:
            processor.check_items(s)
        return samples

    def _rows(self, modality: str, values: Any) -> list[Any]:
        """Split a container of items (e.g. an AnnData of cells) into one entry per prompt."""
        if modality == "cell":
            from scifm.encoders.cell import as_cell_rows

            return as_cell_rows(values)
        if isinstance(values, (str, bytes, dict)) or type(values).__name__ in {"Structure", "Mol"}:
            raise TypeError(
                f"give a list of {modality} items, one per prompt, not a single {type(values).__name__}"
            )
        return list(values)

    def _batches(self, samples: list[Sample]) -> Any:
        for start in range(0, len(samples), self.batch_size):
            yield samples[start : start + self.batch_size]

    # -- API -----------------------------------------------------------------------------------
    @torch.no_grad()
    def generate(
        self,
        prompts: str | Sequence[str],
        *,
        molecules: Sequence[Any] | None = None,
        crystals: Sequence[Any] | None = None,
        cells: Any = None,
        max_new_tokens: int = 64,
        **generate_kwargs: Any,
    ) -> list[str]:
        """Answer each prompt; greedy decoding unless ``generate_kwargs`` say otherwise."""
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        samples = self._samples(prompts, {"molecules": molecules, "crystals": crystals, "cells": cells})
        out: list[str] = []
        for chunk in self._batches(samples):
            out += self.model.generate(chunk, max_new_tokens=max_new_tokens, **generate_kwargs)
        return out

    @torch.no_grad()
    def predict(
        self,
        prompts: str | Sequence[str],
        *,
        molecules: Sequence[Any] | None = None,
        crystals: Sequence[Any] | None = None,
        cells: Any = None,
    ) -> Tensor:
        """Head outputs ``(B, num_outputs)``: values (regression) or class probabilities.

        Raises:
            RuntimeError: the model was trained without a head.
        """
        if self.model.head is None:
            raise RuntimeError("this model has no numeric head (head.kind is 'none'); use generate()")
        prompts = [prompts] if isinstance(prompts, str) else list(prompts)
        samples = self._samples(prompts, {"molecules": molecules, "crystals": crystals, "cells": cells})
        collate = self.model.collator(for_generation=True)
        outputs = []
        for chunk in self._batches(samples):
            result = self.model(move_to(collate(chunk), self.device))
            assert result.head_output is not None
            outputs.append(result.head_output.float().cpu())
        values = torch.cat(outputs)
        if self.model.config.head.kind == "classification":
            values = values.softmax(dim=-1)
        return values

    @property
    def labels(self) -> list[str]:
        """Names of the head's outputs (target columns or classes), as trained."""
        return list(self.model.config.head.labels)

    @torch.no_grad()
    def embed(
        self,
        *,
        molecules: Sequence[Any] | None = None,
        crystals: Sequence[Any] | None = None,
        cells: Any = None,
    ) -> Tensor:
        """One vector per item ``(N, d_model)``: the mean of its soft tokens (connector output)."""
        given = {
            a: v
            for a, v in {"molecules": molecules, "crystals": crystals, "cells": cells}.items()
            if v is not None
        }
        if len(given) != 1:
            raise ValueError("embed() takes exactly one of molecules=, crystals=, cells=")
        ((arg, values),) = given.items()
        modality = _ITEM_ARGS[arg]
        items = [
            self.model.featurize(modality, v, record=f"{arg}[{i}]")
            for i, v in enumerate(self._rows(modality, values))
        ]
        collate = type(encoder_api(self.model.encoders[modality])).collate
        chunks = []
        for start in range(0, len(items), self.batch_size):
            batch = move_to({"b": collate(items[start : start + self.batch_size])}, self.device)["b"]
            tokens, mask = self.model.encode_items({modality: batch})[modality]
            m = mask.unsqueeze(-1).to(tokens.dtype)
            chunks.append(((tokens * m).sum(1) / m.sum(1).clamp(min=1)).float().cpu())
        return torch.cat(chunks)


def load(
    path: str | os.PathLike[str], *, batch_size: int = 8, device: str | torch.device | None = None
) -> Predictor:
    """Load a model saved by ``save_pretrained`` (a directory) or logged to MLflow
    (``runs:/<run_id>/model``, ``models:/<name>/<version>``) as a :class:`Predictor`."""
    text = str(path)
    if text.startswith(("runs:/", "models:/", "mlflow-artifacts:/")):
        import mlflow

        text = mlflow.artifacts.download_artifacts(artifact_uri=text)
    directory = Path(text).expanduser()
    return Predictor(ScifmModel.from_pretrained(directory), batch_size=batch_size, device=device)
