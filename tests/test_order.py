"""The global sample order: exact epoch counts, rank disjointness, resume at any world size."""

from __future__ import annotations

import itertools
import math
from collections import Counter

import numpy as np
import pytest

from xray_pretrain.data.order import (
    MIN_HALF_BITS,
    GlobalOrder,
    RankShare,
    TrainBatchSampler,
    epoch_counts,
    feistel,
    feistel_keys,
    seeded_permutation,
    val_rank_batches,
)


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


@pytest.mark.parametrize("size", [1, 2, 3, 7, 255, 256, 257, 1000, 70_001])
def test_seeded_permutation_is_a_bijection(size):
    offsets = np.arange(size)
    perm = seeded_permutation(offsets, size, feistel_keys(0, 0, size))
    assert sorted(perm.tolist()) == offsets.tolist()
    assert np.array_equal(seeded_permutation(offsets[::-1], size, feistel_keys(0, 0, size)), perm[::-1])
    with pytest.raises(ValueError, match="outside"):
        seeded_permutation(np.array([size]), size, feistel_keys(0, 0, size))


@pytest.mark.parametrize("size", [5, 200, 5000])  # table lookups (domain <= MAX_TABLE_DOMAIN) and not
def test_seeded_permutation_walks_the_network_cycle(size):
    keys = feistel_keys(2, 0)
    half_bits = max(MIN_HALF_BITS, math.ceil((size - 1).bit_length() / 2))
    offsets, expected = np.arange(0, size, max(1, size // 300)), []
    for offset in offsets.tolist():
        value = feistel(np.array([offset], dtype=np.uint64), half_bits, keys)
        while value[0] >= size:
            value = feistel(value, half_bits, keys)
        expected.append(int(value[0]))
    assert seeded_permutation(offsets, size, keys).tolist() == expected


def test_seeded_permutation_mixes():
    """Every order of a tiny folder is reachable about equally often, and a large permutation leaves no
    trace of the identity (no correlation with the offset, none between neighbours)."""
    counts = Counter(
        tuple(seeded_permutation(np.arange(4), 4, feistel_keys(s, 0)).tolist()) for s in range(1200)
    )
    assert len(counts) == 24 and min(counts.values()) > 30 and max(counts.values()) < 70  # 50 expected
    size = 70_001
    perm = seeded_permutation(np.arange(size), size, feistel_keys(1, 0))
    assert abs(np.corrcoef(np.arange(size), perm)[0, 1]) < 0.02
    assert abs(np.corrcoef(perm[:-1], perm[1:])[0, 1]) < 0.02
    assert np.mean(perm == np.arange(size)) < 0.001


def test_order_is_pinned():
    """The order is part of every checkpoint (a position means this sample): a change here breaks
    exact resume of existing runs, so it must be deliberate (and noted in the changelog)."""
    order = GlobalOrder([6, 2], [1, 3], seed=0)
    folders, indices = order.locate_many(range(8))
    assert list(zip(folders.tolist(), indices.tolist())) == [
        (1, 0), (0, 2), (1, 1), (0, 0), (1, 1), (1, 1), (1, 0), (1, 0)
    ]  # fmt: skip
    big = GlobalOrder([10**9], None, seed=1)
    assert big.locate_many([0, 1, 2, 10**9 - 1])[1].tolist() == [73131726, 392569567, 629147533, 115040909]


def test_rank_share_locates_what_the_global_order_does():
    order = GlobalOrder(
        [7, 5, 0, 3], [1, 3, 0, 2], seed=3
    )  # E = 15, oversampled folders, a block crosses epochs
    for world, micro in [(3, 2), (1, 4), (4, 1)]:
        for rank in range(world):
            share = RankShare(order, rank=rank, world_size=world, micro_batch=micro)
            share.micro_steps_per_block = 3  # many blocks over the 200 positions
            mine = [p for p in range(200) if (p // micro) % world == rank]
            assert [share.locate(p) for p in mine] == [order.locate(p) for p in mine]
            with pytest.raises(ValueError, match="not read by rank"):
                share.locate(next(p for p in range(200) if (p // micro) % world != rank) if world > 1 else -1)


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
