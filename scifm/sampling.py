"""Batch sampling that is the same on one process and on many.

:class:`GlobalBatchSampler` draws *global* batches of ``batch_size * world_size`` indices from
one seeded permutation per epoch, and each rank takes its slice. One process with batch size
``G`` and ``G / B`` processes with batch size ``B`` therefore see the same global batches in
the same order, which makes a DDP run comparable to a single-process run, and the sampler's
position is plain data (``state_dict``) for resuming.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from typing import Any

import torch
from torch.utils.data import Sampler


class GlobalBatchSampler(Sampler[list[int]]):
    """Yields this rank's share of each global batch.

    Args:
        num_samples: size of the dataset.
        batch_size: samples per batch on each rank ``B``.
        shuffle: a new seeded permutation each epoch (else dataset order).
        seed: base seed; epoch ``e`` uses ``seed + e``.
        rank, world_size: this process and the number of processes (default: 0, 1).
        drop_last: drop a last incomplete global batch; otherwise it is filled up from the
            start of the epoch's order, so every rank runs the same number of steps.
        lengths: per-sample lengths for length grouping (default: None, no grouping). Each run
            of ``group_batches`` shuffled global batches is sorted by length before it is cut into
            batches, and the batches are shuffled again, so a batch holds samples of similar
            length (little padding) while the epoch order stays random and seeded.
        group_batches: global batches per sorted group (default: 50).
    """

    def __init__(
        self,
        num_samples: int,
        *,
        batch_size: int,
        shuffle: bool,
        seed: int = 0,
        rank: int = 0,
        world_size: int = 1,
        drop_last: bool = False,
        lengths: Sequence[int] | None = None,
        group_batches: int = 50,
    ) -> None:
        if num_samples <= 0:
            raise ValueError("cannot sample batches from an empty dataset")
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world_size {world_size}")
        self.num_samples, self.batch_size, self.shuffle, self.seed = num_samples, batch_size, shuffle, seed
        self.rank, self.world_size, self.drop_last = rank, world_size, drop_last
        if lengths is not None and len(lengths) != num_samples:
            raise ValueError(f"{len(lengths)} lengths for {num_samples} samples")
        self.lengths = list(lengths) if lengths is not None else None
        self.group_batches = group_batches
        self.epoch = 0
        self.start_batch = 0  # first global batch of the current epoch still to yield (resume)

    @property
    def global_batch_size(self) -> int:
        return self.batch_size * self.world_size

    def num_global_batches(self) -> int:
        n = self.num_samples / self.global_batch_size
        return int(n) if self.drop_last else math.ceil(n)

    @property
    def sampler(self) -> GlobalBatchSampler:
        """Itself. Lightning calls ``set_epoch`` at each epoch's start on a DataLoader's
        ``sampler`` and ``batch_sampler.sampler``, never on the batch sampler itself."""
        return self

    def skip_to(self, epoch: int, start_batch: int) -> None:
        """Resume at global batch ``start_batch`` of ``epoch`` (past the epoch's end: the next one)."""
        if start_batch >= self.num_global_batches():
            epoch, start_batch = epoch + 1, 0
        self.epoch, self.start_batch = epoch, start_batch

    def set_epoch(self, epoch: int) -> None:
        if epoch != self.epoch:
            self.epoch, self.start_batch = epoch, 0

    def order(self) -> list[int]:
        if not self.shuffle:
            return list(range(self.num_samples))
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(self.num_samples, generator=generator).tolist()
        if self.lengths is None:
            return order
        g = self.global_batch_size
        size = g * self.group_batches
        lengths = self.lengths
        grouped: list[int] = []
        for start in range(0, len(order), size):
            grouped += sorted(order[start : start + size], key=lambda i: -lengths[i])
        batches = [grouped[b : b + g] for b in range(0, len(grouped), g)]
        full = [b for b in batches if len(b) == g]
        rest = [b for b in batches if len(b) < g]  # the short one stays last (filled up there)
        shuffled = [full[i] for i in torch.randperm(len(full), generator=generator).tolist()]
        return [i for batch in shuffled + rest for i in batch]

    def __iter__(self) -> Iterator[list[int]]:
        order = self.order()
        g = self.global_batch_size
        for b in range(self.start_batch, self.num_global_batches()):
            batch = order[b * g : (b + 1) * g]
            while len(batch) < g:  # fill the last global batch from the epoch's start
                batch += order[: g - len(batch)]
            yield batch[self.rank * self.batch_size : (self.rank + 1) * self.batch_size]

    def __len__(self) -> int:
        # The whole epoch, also when resuming mid-epoch: Lightning's loop counts a resumed
        # epoch's batches from where it stopped, against this length.
        return self.num_global_batches()

    def state_dict(self) -> dict[str, Any]:
        return {"epoch": self.epoch, "start_batch": self.start_batch, "seed": self.seed}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        if state["seed"] != self.seed:
            raise ValueError(f"sampler state was saved with seed {state['seed']}, this run uses {self.seed}")
        self.epoch, self.start_batch = int(state["epoch"]), int(state["start_batch"])
