"""Text side of the data flow: prompts with placeholders -> token ids, labels and batches.

Each placeholder (``<mol>``, ``<crystal>``, ``<cell>``) in a prompt is expanded at
tokenization to as many placeholder ids as soft tokens its item yields (``K`` for a
resampler connector, the item's encoder tokens for an MLP projector). The model later
writes the connector output into exactly those positions (:func:`scifm.splice.splice`).
Labels are ``-100`` everywhere but on the answer tokens (and the closing eos).
"""

from __future__ import annotations

import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any, Literal

import torch
from transformers import PreTrainedTokenizerBase

from scifm.errors import InvalidInputError

IGNORE_INDEX = -100


@dataclass
class Sample:
    """One training or inference example before tokenization.

    ``items[modality]`` holds the featurized items in the order their placeholders appear in
    ``prompt``. ``target`` is the numeric head's target (floats for regression, a class index
    for classification), or None.
    """

    id: str
    prompt: str
    answer: str | None = None
    items: dict[str, list[Any]] = field(default_factory=dict)
    target: list[float] | int | None = None


@dataclass(frozen=True)
class TokenCount:
    """How many soft tokens one item of a modality becomes.

    ``fixed`` for connectors with a fixed output (the resampler's ``K``); otherwise
    ``per_item(item)`` (e.g. the number of atoms, for an MLP projector).
    """

    fixed: int | None = None
    per_item: Callable[[Any], int] | None = None

    def __call__(self, item: Any) -> int:
        if self.fixed is not None:
            return self.fixed
        if self.per_item is None:
            raise ValueError("TokenCount needs either fixed or per_item")
        return self.per_item(item)


class PromptProcessor:
    """Tokenizes prompts/answers and expands placeholders; picklable for DataLoader workers.

    Args:
        tokenizer: the backbone's tokenizer, with the placeholder tokens already added.
        placeholders: modality -> placeholder text, e.g. ``{"molecule": "<mol>"}``.
        token_counts: modality -> :class:`TokenCount`.
        use_chat_template: wrap the prompt as a user turn of the tokenizer's chat template,
            when it has one (default: True).
        max_length: longest sequence. An answer that would run past it is cut at the end;
            a prompt that alone is longer raises :class:`InvalidInputError`, since cutting it
            could drop a placeholder (default: 512).
    """

    def __init__(
        self,
        tokenizer: PreTrainedTokenizerBase,
        *,
        placeholders: dict[str, str],
        token_counts: dict[str, TokenCount],
        use_chat_template: bool = True,
        max_length: int = 512,
    ) -> None:
        self.tokenizer = tokenizer
        self.placeholders = dict(placeholders)
        self.token_counts = dict(token_counts)
        self.placeholder_ids = {m: tokenizer.convert_tokens_to_ids(t) for m, t in placeholders.items()}
        self.use_chat_template = use_chat_template and tokenizer.chat_template is not None
        self.max_length = max_length
        self._pattern = re.compile("|".join(re.escape(t) for t in placeholders.values()))
        self._modality_of = {t: m for m, t in placeholders.items()}
        self._prompt_cache: dict[str, list[int]] = {}

    # -- single sample -------------------------------------------------------------------
    def placeholders_in(self, text: str) -> list[str]:
        """Modalities of the placeholders in ``text``, in order."""
        return [self._modality_of[m.group(0)] for m in self._pattern.finditer(text)]

    def check_items(self, sample: Sample) -> None:
        """Raise :class:`InvalidInputError` unless each placeholder has exactly one item."""
        order = self.placeholders_in(sample.prompt)
        for modality in sorted(set(order) | set(sample.items)):
            if modality not in self.placeholders:
                raise InvalidInputError(
                    sample.id, f"this model has no {modality!r} encoder; it reads {sorted(self.placeholders)}"
                )
            wanted, given = order.count(modality), len(sample.items.get(modality, []))
            if wanted != given:
                raise InvalidInputError(
                    sample.id,
                    f"the prompt has {wanted} {self.placeholders[modality]} placeholder(s) but "
                    f"{given} {modality} item(s) were given (prompt: {sample.prompt[:120]!r})",
                )
        if sample.answer is not None and self.placeholders_in(sample.answer):
            raise InvalidInputError(
                sample.id, "placeholders may appear only in the prompt, not in the answer"
            )

    def prompt_text(self, prompt: str) -> str:
        if self.use_chat_template:
            text = self.tokenizer.apply_chat_template(
                [{"role": "user", "content": prompt}], tokenize=False, add_generation_prompt=True
            )
            assert isinstance(text, str)
            return text
        return prompt + "\n"

    def _prompt_ids(self, prompt: str) -> list[int]:
        """Token ids of the templated prompt, memoized: data sets repeat a few prompts many
        times, and rendering the chat template is the slow part of tokenization."""
        ids = self._prompt_cache.get(prompt)
        if ids is None:
            text = self.prompt_text(prompt)
            ids = list(self.tokenizer(text, add_special_tokens=not self.use_chat_template)["input_ids"])
            if len(self._prompt_cache) < 4096:
                self._prompt_cache[prompt] = ids
        return ids

    def encode(self, sample: Sample) -> dict[str, list[int]]:
        """Return ``input_ids`` and ``labels`` (``-100`` outside the answer) for one sample."""
        self.check_items(sample)
        raw = self._prompt_ids(sample.prompt)
        prompt_ids: list[int] = []
        cursor = {m: 0 for m in self.placeholders}
        id_to_modality = {i: m for m, i in self.placeholder_ids.items()}
        for tok in raw:
            modality = id_to_modality.get(tok)
            if modality is None:
                prompt_ids.append(tok)
                continue
            item = sample.items[modality][cursor[modality]]
            cursor[modality] += 1
            prompt_ids.extend([tok] * self.token_counts[modality](item))
        if len(prompt_ids) > self.max_length:
            raise InvalidInputError(
                sample.id,
                f"the prompt is {len(prompt_ids)} tokens (placeholders expanded), over max_length="
                f"{self.max_length}; it is not cut since that could drop a placeholder",
            )
        labels = [IGNORE_INDEX] * len(prompt_ids)
        if sample.answer is not None:
            answer_ids = self.tokenizer(sample.answer, add_special_tokens=False)["input_ids"]
            answer_ids = [*answer_ids, self.tokenizer.eos_token_id]
            answer_ids = answer_ids[: self.max_length - len(prompt_ids)]
            prompt_ids = prompt_ids + answer_ids
            labels = labels + answer_ids
        return {"input_ids": prompt_ids, "labels": labels, "prompt_length": [len(raw)]}


class Collator:
    """Turns a list of :class:`Sample` into a padded batch; runs inside DataLoader workers.

    Args:
        processor: the :class:`PromptProcessor`.
        item_collate: modality -> function batching that modality's featurized items
            (e.g. ``Batch.from_data_list`` for molecular graphs).
        padding_side: "right" for training, "left" for generation (default: "right").
        with_answers: keep the answers as labels (training) or leave them out (generation).

    The batch has ``input_ids``, ``attention_mask``, ``labels`` ``(B, L)``,
    ``last_prompt_index`` ``(B,)`` (position of the last prompt token, where heads read),
    ``items`` (modality -> batched items, in placeholder order across the batch), ``ids``,
    ``answers`` (the reference answers, also when they are left out of the input for
    generation) and, when every sample has one, ``target``.
    """

    def __init__(
        self,
        processor: PromptProcessor,
        item_collate: dict[str, Callable[[list[Any]], Any]],
        *,
        padding_side: Literal["right", "left"] = "right",
        with_answers: bool = True,
    ) -> None:
        self.processor = processor
        self.item_collate = dict(item_collate)
        self.padding_side = padding_side
        self.with_answers = with_answers

    def __call__(self, samples: Sequence[Sample]) -> dict[str, Any]:
        pad_id = self.processor.tokenizer.pad_token_id
        encoded = []
        for s in samples:
            if not self.with_answers:
                s = Sample(id=s.id, prompt=s.prompt, answer=None, items=s.items, target=s.target)
            encoded.append(self.processor.encode(s))
        lengths = [len(e["input_ids"]) for e in encoded]
        width = max(lengths)
        input_ids = torch.full((len(samples), width), pad_id, dtype=torch.long)
        labels = torch.full((len(samples), width), IGNORE_INDEX, dtype=torch.long)
        attention = torch.zeros((len(samples), width), dtype=torch.long)
        last_prompt = torch.zeros(len(samples), dtype=torch.long)
        for row, (e, n) in enumerate(zip(encoded, lengths, strict=True)):
            start = width - n if self.padding_side == "left" else 0
            input_ids[row, start : start + n] = torch.tensor(e["input_ids"])
            labels[row, start : start + n] = torch.tensor(e["labels"])
            attention[row, start : start + n] = 1
            n_prompt = sum(1 for lab in e["labels"] if lab == IGNORE_INDEX)
            last_prompt[row] = start + n_prompt - 1
        items: dict[str, Any] = {}
        for modality, collate in self.item_collate.items():
            flat = [item for s in samples for item in s.items.get(modality, [])]
            if flat:
                items[modality] = collate(flat)
        batch: dict[str, Any] = {
            "input_ids": input_ids,
            "attention_mask": attention,
            "labels": labels,
            "last_prompt_index": last_prompt,
            "items": items,
            "ids": [s.id for s in samples],
            "answers": [s.answer for s in samples],  # reference texts, kept for evaluation
        }
        targets = [s.target for s in samples]
        if targets and all(t is not None for t in targets):
            if isinstance(targets[0], int):
                batch["target"] = torch.tensor(targets, dtype=torch.long)
            else:
                batch["target"] = torch.tensor(targets, dtype=torch.float32)
        return batch
