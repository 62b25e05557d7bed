"""scifm: science foundation models — domain encoders as soft tokens in a pretrained causal LLM.

Import cost is kept low: heavy modules (transformers, lightning, rdkit, ...) load on first use.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from scifm.errors import InvalidInputError, MissingExtraError

__version__ = "0.1.0"
__all__ = ["InvalidInputError", "MissingExtraError", "Predictor", "__version__", "load"]

if TYPE_CHECKING:
    from scifm.predictor import Predictor


def load(path: str, **kwargs: Any) -> Predictor:
    """Load a saved model (a directory or an ``mlflow`` model URI) as a :class:`Predictor`."""
    from scifm.predictor import load as _load

    return _load(path, **kwargs)


def __getattr__(name: str) -> Any:
    if name == "Predictor":
        from scifm.predictor import Predictor

        return Predictor
    raise AttributeError(f"module 'scifm' has no attribute {name!r}")
