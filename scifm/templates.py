"""Prompt/answer templates that turn a table of properties into instruction data.

A template is YAML (a file in ``configs/templates/``, a path, or an inline mapping)::

    prompt: "What is the hydration free energy of <mol>?"
    answer: "{expt:.2f} kcal/mol"
    targets: [expt]          # optional: numeric columns for a regression head
    label: null              # optional: a class column for a classification head

``{column}`` fields are filled from each record with Python's format mini-language.
"""

from __future__ import annotations

import math
import string
from collections.abc import Mapping
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import Any

import yaml

from scifm.errors import InvalidInputError


@dataclass
class Template:
    prompt: str
    answer: str | None = None
    # Numeric columns read by a regression head, in order.
    targets: list[str] = field(default_factory=list)
    # A column of class labels read by a classification head.
    label: str | None = None
    # Class order for ``label``; empty = sorted labels of the training data.
    classes: list[str] = field(default_factory=list)

    def __post_init__(self) -> None:
        if self.targets and self.label is not None:
            raise ValueError("a template has either regression targets or a class label, not both")

    def fields(self) -> list[str]:
        """Record columns the template reads (prompt, answer, targets and label)."""
        names: list[str] = []
        for text in (self.prompt, self.answer or ""):
            names += [f.split(".")[0].split("[")[0] for _, f, _, _ in string.Formatter().parse(text) if f]
        names += self.targets + ([self.label] if self.label else [])
        return list(dict.fromkeys(names))

    def render(self, row: Mapping[str, Any], *, record: str) -> tuple[str, str | None]:
        """Fill the prompt and answer from ``row``; an empty field raises :class:`InvalidInputError`."""
        for name in self.fields():
            if name not in row:
                raise InvalidInputError(record, f"the template reads column {name!r}, which the record lacks")
            if _is_missing(row[name]):
                raise InvalidInputError(record, f"column {name!r} is empty")
        try:
            prompt = self.prompt.format_map(row)
            answer = None if self.answer is None else self.answer.format_map(row)
        except (ValueError, TypeError) as exc:
            raise InvalidInputError(record, f"cannot fill the template: {exc}") from exc
        return prompt, answer

    def target(self, row: Mapping[str, Any], *, record: str) -> list[float] | None:
        if not self.targets:
            return None
        try:
            values = [float(row[c]) for c in self.targets]
        except (TypeError, ValueError) as exc:
            raise InvalidInputError(record, f"target columns {self.targets} are not numeric: {exc}") from exc
        if not all(math.isfinite(v) for v in values):
            raise InvalidInputError(record, f"target columns {self.targets} hold a NaN or infinite value")
        return values


def _is_missing(value: Any) -> bool:
    return value is None or (isinstance(value, float) and math.isnan(value))


def load_template(spec: str | Mapping[str, Any]) -> Template:
    """A template from an inline mapping, a YAML path, or a name in ``configs/templates/``.

    Raises:
        FileNotFoundError: no file or bundled template of that name (the bundled names listed).
        ValueError: the YAML has unknown keys or lacks ``prompt``.
    """
    if isinstance(spec, Mapping):
        data = dict(spec)
    else:
        path = Path(spec).expanduser()
        if path.is_file():
            data = yaml.safe_load(path.read_text())
        else:
            bundled = resources.files("scifm.configs") / "templates" / f"{spec}.yaml"
            if not bundled.is_file():
                names = sorted(
                    p.name.removesuffix(".yaml")
                    for p in (resources.files("scifm.configs") / "templates").iterdir()
                    if p.name.endswith(".yaml")
                )
                raise FileNotFoundError(f"template {spec!r} is neither a file nor a bundled template {names}")
            data = yaml.safe_load(bundled.read_text())
    if not isinstance(data, dict) or "prompt" not in data:
        raise ValueError(f"template {spec!r} must be a mapping with at least a 'prompt' key")
    unknown = set(data) - {"prompt", "answer", "targets", "label", "classes", "description"}
    if unknown:
        raise ValueError(f"template {spec!r} has unknown keys {sorted(unknown)}")
    data.pop("description", None)
    return Template(**data)
