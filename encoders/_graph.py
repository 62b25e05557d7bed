"""What every encoder over PyG graphs (one token per node) shares: token count and batching."""

from __future__ import annotations

from typing import TYPE_CHECKING, Any, ClassVar

from scifm._extras import require

if TYPE_CHECKING:
    from torch_geometric.data import Batch, Data


class GraphItems:
    """Mixin for encoders whose items are ``torch_geometric`` graphs, one token per node.

    Subclasses set ``item_name`` (for messages) and ``extra`` (the ``scifm[...]`` extra that
    installs torch-geometric for them).
    """

    item_name: ClassVar[str] = "graph"
    extra: ClassVar[str] = "molecule"

    @staticmethod
    def item_tokens(item: Data) -> int:
        """Number of tokens one featurized item yields: its number of nodes (atoms)."""
        return int(item.num_nodes)

    @classmethod
    def collate(cls, items: list[Data]) -> Batch:
        """Batch featurized items for ``forward``.

        Raises:
            ValueError: ``items`` is empty.
        """
        if not items:
            raise ValueError(f"collate needs at least one {cls.item_name}, got an empty list")
        batch_cls: Any = require("torch_geometric.data", extra=cls.extra).Batch
        return batch_cls.from_data_list(items)  # type: ignore[no-any-return]
