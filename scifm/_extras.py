"""Import optional dependencies where they are needed, with a message naming the extra."""

from __future__ import annotations

import importlib
from types import ModuleType

from scifm.errors import MissingExtraError


def require(module: str, *, extra: str) -> ModuleType:
    """Import ``module`` or raise :class:`MissingExtraError` naming ``pip install "scifm[extra]"``."""
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise MissingExtraError(module.split(".")[0], extra) from exc
