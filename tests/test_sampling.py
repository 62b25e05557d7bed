"""Length grouping in the global batch sampler: same coverage, less padding, still seeded."""

from __future__ import annotations

import random

from scifm.sampling import GlobalBatchSampler


def _padding(batches: list[list[int]], lengths: list[int]) -> float:
    padded = sum(max(lengths[i] for i in b) * len(b) for b in batches)
    return 1 - sum(lengths[i] for b in batches for i in b) / padded


def test_length_grouping_cuts_padding_and_keeps_every_sample() -> None:
    rng = random.Random(0)
    lengths = [rng.randint(10, 400) for _ in range(1000)]
    plain = list(GlobalBatchSampler(1000, batch_size=8, shuffle=True, seed=3))
    grouped_sampler = GlobalBatchSampler(
        1000, batch_size=8, shuffle=True, seed=3, lengths=lengths, group_batches=20
    )
    grouped = list(grouped_sampler)
    assert sorted(i for b in grouped for i in b) == list(range(1000))
    assert _padding(grouped, lengths) < 0.5 * _padding(plain, lengths)
    assert grouped == list(
        GlobalBatchSampler(1000, batch_size=8, shuffle=True, seed=3, lengths=lengths, group_batches=20)
    )
    grouped_sampler.set_epoch(1)
    assert list(grouped_sampler) != grouped
    # ranks still split the same global batches
    ranks = [
        list(
            GlobalBatchSampler(
                1000,
                batch_size=4,
                shuffle=True,
                seed=3,
                lengths=lengths,
                group_batches=20,
                rank=r,
                world_size=2,
            )
        )
        for r in (0, 1)
    ]
    assert [a + b for a, b in zip(*ranks, strict=True)] == grouped
