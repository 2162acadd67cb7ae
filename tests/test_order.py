"""The global sample order: exact epoch counts, rank disjointness, resume at any world size."""

from __future__ import annotations

import itertools
from collections import Counter

import numpy as np
import pytest

from xray_pretrain.data.order import GlobalOrder, TrainBatchSampler, epoch_counts, val_rank_batches


def test_epoch_counts_proportional_and_weighted():
    assert epoch_counts([10, 2, 0]) == [10, 2, 0]
    assert epoch_counts([10, 2], [1, 1]) == [6, 6]
    assert epoch_counts([5, 5, 5], [1, 2, 0]) == [5, 10, 0]
    # quotas 7/3 each: floors 2+2+2 = 6, the one missing sample goes to the first folder (tie)
    assert epoch_counts([3, 3, 1], [1, 1, 1]) == [3, 2, 2]
    # largest remainder: quotas 1.4, 5.6 -> 1, 6
    assert epoch_counts([4, 3], [0.2, 0.8]) == [1, 6]


@pytest.mark.parametrize(
    "sizes, weights, match",
    [([4, 0], [1, 1], "has no samples"), ([4, 4], [1, -1], ">= 0"), ([4, 4], [1], "2 shard folders")],
)
def test_epoch_counts_refuses_bad_weights(sizes, weights, match):
    with pytest.raises(ValueError, match=match):
        epoch_counts(sizes, weights)


def test_epoch_is_a_permutation_and_epochs_differ():
    order = GlobalOrder([7, 5], None, seed=3)
    for epoch in range(3):
        folders, indices = order.epoch(epoch)
        pairs = sorted(zip(folders.tolist(), indices.tolist()))
        assert pairs == [(0, i) for i in range(7)] + [(1, i) for i in range(5)]
    assert not np.array_equal(order.epoch(0)[1], order.epoch(1)[1])
    again = GlobalOrder([7, 5], None, seed=3)
    assert np.array_equal(again.epoch(1)[0], order.epoch(1)[0]) and np.array_equal(
        again.epoch(1)[1], order.epoch(1)[1]
    )
    other_seed = GlobalOrder([7, 5], None, seed=4)
    assert not np.array_equal(other_seed.epoch(0)[1], order.epoch(0)[1])


def test_weighted_epoch_has_exact_counts_and_even_oversampling():
    order = GlobalOrder([6, 2], [1, 3], seed=0)  # E = 8: 2 from folder 0, 6 from folder 1
    assert order.counts == [2, 6] and order.num_samples_per_epoch == 8
    for epoch in range(4):
        folders, indices = order.epoch(epoch)
        assert Counter(folders.tolist()) == {0: 2, 1: 6}
        # folder 1 has 2 samples drawn 6 times: each exactly 3 times
        assert Counter(indices[folders == 1].tolist()) == {0: 3, 1: 3}
        # folder 0 gives 2 of its 6 samples, without replacement
        assert len(set(indices[folders == 0].tolist())) == 2


def test_locate_crosses_epoch_boundaries():
    order = GlobalOrder([4, 3], None, seed=1)
    stream = [order.locate(p) for p in range(3 * 7)]
    for epoch in range(3):
        folders, indices = order.epoch(epoch)
        assert stream[epoch * 7 : (epoch + 1) * 7] == list(zip(folders.tolist(), indices.tolist()))


def take(sampler: TrainBatchSampler, num_batches: int) -> list[list[int]]:
    return list(itertools.islice(iter(sampler), num_batches))


def test_ranks_are_disjoint_and_cover_the_stream():
    world, micro, accum = 3, 2, 2
    per_rank = [
        take(TrainBatchSampler(rank=r, world_size=world, micro_batch=micro, accum_steps=accum), 8)
        for r in range(world)
    ]
    seen = [p for batches in per_rank for batch in batches for p in batch]
    assert sorted(seen) == list(range(8 * world * micro))  # disjoint and gap-free
    # step s, micro-step a, rank r reads s*G + a*world*micro + r*micro + [0, micro)
    G = micro * world * accum
    assert per_rank[1][3] == [1 * G + 1 * world * micro + 1 * micro + i for i in range(micro)]


def test_same_samples_per_step_after_world_size_change():
    def steps(world: int, accum: int, micro: int, num_steps: int, start: int = 0) -> list[list[int]]:
        samplers = [
            iter(
                TrainBatchSampler(
                    rank=r, world_size=world, micro_batch=micro, accum_steps=accum, start_position=start
                )
            )
            for r in range(world)
        ]
        out = []
        for _ in range(num_steps):
            out.append(sorted(p for _a in range(accum) for s in samplers for p in next(s)))
        return out

    reference = steps(world=4, accum=1, micro=2, num_steps=6)  # G = 8
    assert steps(world=2, accum=2, micro=2, num_steps=6) == reference
    assert steps(world=1, accum=4, micro=2, num_steps=6) == reference
    assert steps(world=1, accum=2, micro=4, num_steps=3, start=3 * 8) == reference[3:]


def test_start_position_must_be_a_step_boundary():
    with pytest.raises(ValueError, match="not a multiple of the global batch 8"):
        TrainBatchSampler(rank=0, world_size=2, micro_batch=2, accum_steps=2, start_position=12)
    with pytest.raises(ValueError, match="outside world size"):
        TrainBatchSampler(rank=2, world_size=2, micro_batch=2, accum_steps=1)


def test_val_batches_equal_per_rank_with_weight0_padding():
    num_samples, world, micro = 5, 4, 1
    per_rank = [val_rank_batches(num_samples, r, world, micro) for r in range(world)]
    assert {len(b) for b in per_rank} == {2}
    real = [i for batches in per_rank for batch in batches for i, w in batch if w == 1.0]
    assert sorted(real) == list(range(num_samples))
    padding = [(i, w) for batches in per_rank for batch in batches for i, w in batch if w != 1.0]
    assert padding == [(0, 0.0)] * 3
    assert per_rank[1] == [[(1, 1.0)], [(0, 0.0)]]
    assert val_rank_batches(0, 0, 2, 4) == []
