"""The global sample order, and which rank reads which position of it.

Training reads one infinite, seeded stream of samples: epoch 0's order, then epoch 1's, ... A sample's
place in that stream (its *position*) is the only data state a checkpoint stores (`samples_seen`), so
a run resumes exactly, at any world size, on either loader backend.

Epoch e has E = sum of the folders' sizes samples. Folder f contributes ``counts[f]`` of them (see
`epoch_counts`), drawn without replacement from a permutation seeded by (seed, e, f); a folder that
must give more samples than it has continues with further permutations (seeded by (seed, e, f, k)),
so every sample of it appears floor(c/n) or ceil(c/n) times. The E draws are then shuffled together
by a permutation seeded by (seed, e).

Optimizer step s consumes positions [s*G, (s+1)*G) with G = micro_batch * world_size * accum_steps.
Micro-step a of step s on rank r reads positions s*G + a*world*micro + r*micro + [0, micro), i.e.
micro-step m = s*accum + a reads m*world*micro + r*micro + [0, micro). Ranks are disjoint and together
read every position once; the stream never ends, so no rank needs padding and every rank yields the
same number of batches (the trainer stops by steps). With the same G, any (world, accum) split reads
the same samples per optimizer step.
"""

from __future__ import annotations

import itertools
import math
from collections import OrderedDict
from collections.abc import Iterator, Sequence

import numpy as np

from xray_pretrain.data.heap import release_freed_heap

# Tags keep the seeded streams independent of each other (SeedSequence([seed, tag, ...])).
TAG_EPOCH_SHUFFLE = 0
TAG_FOLDER_DRAW = 1
TAG_AUGMENT = 2
TAG_REPLACE = 3  # replacements for corrupt samples (data/badsamples.py)


def seeded_rng(seed: int, tag: int, *values: int) -> np.random.Generator:
    """A generator determined only by (seed, tag, values): no global state, same in every process."""
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, tag, *values])))


def epoch_counts(folder_sizes: Sequence[int], weights: Sequence[float] | None = None) -> list[int]:
    """Samples per epoch from each folder. E = sum(folder_sizes) always.

    Without weights every folder gives its size. With weights, folder f's quota is w_f/sum(w) * E;
    counts are rounded by the largest-remainder rule (floor every quota, then give the samples still
    missing to the largest fractional parts, earlier folder first on ties), so they sum to E exactly
    and each is its quota rounded down or up.
    """
    sizes = [int(n) for n in folder_sizes]
    if weights is None:
        return sizes
    if len(weights) != len(sizes):
        raise ValueError(f"{len(weights)} weights for {len(sizes)} shard folders")
    total_weight = float(sum(weights))
    if total_weight <= 0 or any(w < 0 for w in weights):
        raise ValueError(f"data.weights must be >= 0 with a positive sum, got {list(weights)}")
    for size, weight in zip(sizes, weights):
        if weight > 0 and size == 0:
            raise ValueError(f"a shard folder with weight {weight} has no samples in this split")
    num_total = sum(sizes)
    quotas = np.array([w / total_weight * num_total for w in weights])
    counts = np.floor(quotas).astype(np.int64)
    num_missing = num_total - int(counts.sum())
    by_remainder = np.argsort(-(quotas - counts), kind="stable")
    counts[by_remainder[:num_missing]] += 1
    return [int(c) for c in counts]


class GlobalOrder:
    """Maps a global stream position to (folder index, sample index within the folder's split)."""

    def __init__(
        self,
        folder_sizes: Sequence[int],
        weights: Sequence[float] | None,
        seed: int,
        num_cached_epochs: int = 2,
    ):
        if seed < 0:
            raise ValueError(f"seed must be >= 0, got {seed}")
        self.folder_sizes = [int(n) for n in folder_sizes]
        self.counts = epoch_counts(self.folder_sizes, weights)
        self.num_samples_per_epoch = sum(self.counts)
        if self.num_samples_per_epoch == 0:
            raise ValueError("the training split is empty in every shard folder")
        self.seed = seed
        self._num_cached_epochs = num_cached_epochs
        self._cache: OrderedDict[int, tuple[np.ndarray, np.ndarray]] = OrderedDict()

    def epoch(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """(folder_E int32, index_E int64): epoch `epoch`'s samples in stream order (cached)."""
        if epoch in self._cache:
            self._cache.move_to_end(epoch)
            return self._cache[epoch]
        folders, indices = self.compute_epoch(epoch)
        entry = (folders.astype(np.int32), indices.astype(np.int64))
        self._cache[epoch] = entry
        if len(self._cache) > self._num_cached_epochs:
            self._cache.popitem(last=False)
        return entry

    def compute_epoch(self, epoch: int, offsets: np.ndarray | None = None) -> tuple[np.ndarray, np.ndarray]:
        """(folder int16, index int32) at the epoch's `offsets` (default: all E), uncached: what
        `epoch` returns there, in the narrowest dtypes.

        Shuffling an int32 arange draws exactly what `Generator.permutation(n)` draws (same
        Fisher-Yates over the same random stream) at half the memory. The two shuffles are O(E)
        whatever `offsets` is (the order is a permutation of the whole epoch); the gathers are
        O(len(offsets)). At 10M samples: ~8 bytes per sample while this runs, ~1 s of one core."""
        index_parts = []
        for folder, (size, count) in enumerate(zip(self.folder_sizes, self.counts)):
            if count == 0:
                continue
            perms = []
            for k in range(math.ceil(count / size)):
                perm = np.arange(size, dtype=np.int32)
                seeded_rng(self.seed, TAG_FOLDER_DRAW, epoch, folder, k).shuffle(perm)
                perms.append(perm)
            index_parts.append(np.concatenate(perms)[:count])
        num = self.num_samples_per_epoch
        shuffle = np.arange(num, dtype=np.int32 if num < 2**31 else np.int64)
        seeded_rng(self.seed, TAG_EPOCH_SHUFFLE, epoch).shuffle(shuffle)
        drawn = shuffle if offsets is None else shuffle[offsets]  # rows of the folder-ordered draws
        folder_ends = np.cumsum(self.counts)
        folders = np.searchsorted(folder_ends, drawn, side="right").astype(np.int16)
        return folders, np.concatenate(index_parts)[drawn]

    def locate(self, position: int) -> tuple[int, int]:
        """(folder index, sample index) at global stream position `position` (>= 0)."""
        epoch, offset = divmod(int(position), self.num_samples_per_epoch)
        folders, indices = self.epoch(epoch)
        return int(folders[offset]), int(indices[offset])


class RankShare:
    """The part of the global order that one rank reads, and nothing else.

    `GlobalOrder.epoch` keeps ~12 bytes per sample of the whole epoch; a rank reads 1/world of it.
    This keeps, per cached epoch, only the (folder, index) of this rank's positions (6 bytes each,
    so 6/world bytes per sample), computed from the same seeded epoch, so `locate` answers exactly
    what `GlobalOrder.locate` answers. Asking for another rank's position is a ValueError.
    """

    def __init__(
        self, order: GlobalOrder, *, rank: int, world_size: int, micro_batch: int, num_cached_epochs: int = 2
    ):
        if not 0 <= rank < world_size or micro_batch < 1:
            raise ValueError(f"rank {rank} outside world size {world_size}, or micro_batch {micro_batch} < 1")
        self.order, self.rank, self.world_size, self.micro_batch = order, rank, world_size, micro_batch
        self._num_cached_epochs = num_cached_epochs
        self._cache: OrderedDict[int, tuple[np.ndarray, np.ndarray]] = OrderedDict()

    def _num_before(self, position: int) -> int:
        """How many of this rank's positions lie in [0, position)."""
        block = self.micro_batch * self.world_size
        into_block = position % block - self.rank * self.micro_batch
        return position // block * self.micro_batch + min(max(into_block, 0), self.micro_batch)

    def _epoch(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        if epoch in self._cache:
            self._cache.move_to_end(epoch)
            return self._cache[epoch]
        size = self.order.num_samples_per_epoch
        start, block = epoch * size, self.micro_batch * self.world_size
        run_starts = np.arange(start - start % block + self.rank * self.micro_batch, start + size, block)
        mine = (run_starts[:, None] + np.arange(self.micro_batch)).ravel()
        mine = mine[(mine >= start) & (mine < start + size)] - start
        entry = self.order.compute_epoch(epoch, mine)
        del mine, run_starts
        release_freed_heap()
        self._cache[epoch] = entry
        if len(self._cache) > self._num_cached_epochs:
            self._cache.popitem(last=False)
        return entry

    def locate(self, position: int) -> tuple[int, int]:
        """(folder index, sample index) at global position `position`, one that this rank reads."""
        position = int(position)
        if position < 0 or (position // self.micro_batch) % self.world_size != self.rank:
            raise ValueError(f"position {position} is not read by rank {self.rank} of {self.world_size}")
        epoch = position // self.order.num_samples_per_epoch
        folders, indices = self._epoch(epoch)
        slot = self._num_before(position) - self._num_before(epoch * self.order.num_samples_per_epoch)
        return int(folders[slot]), int(indices[slot])


def located_batches(sampler: TrainBatchSampler, share: RankShare) -> Iterator[list[tuple[int, int, int]]]:
    """The sampler's micro-batches as (position, folder, index) rows, located in this process: the
    order lives in the process that schedules (the training process), never in loader workers."""
    for positions in sampler:
        yield [(p, *share.locate(p)) for p in positions]


def micro_batch_positions(micro_step: int, rank: int, micro_batch: int, world_size: int) -> list[int]:
    """Global positions that `rank` reads at global micro-step `micro_step` (see the module docstring)."""
    start = (micro_step * world_size + rank) * micro_batch
    return list(range(start, start + micro_batch))


class TrainBatchSampler:
    """Infinite iterable of this rank's micro-batches of global positions, starting at `start_position`.

    `start_position` is the checkpoint's `samples_seen`; it must be a multiple of the global batch G so
    that a resumed run (at any world size with the same G) reads the same samples per step.
    """

    def __init__(
        self, *, rank: int, world_size: int, micro_batch: int, accum_steps: int, start_position: int = 0
    ):
        if not 0 <= rank < world_size:
            raise ValueError(f"rank {rank} is outside world size {world_size}")
        if micro_batch < 1 or accum_steps < 1:
            raise ValueError(f"micro_batch ({micro_batch}) and accum_steps ({accum_steps}) must be >= 1")
        self.rank, self.world_size, self.micro_batch = rank, world_size, micro_batch
        self.global_batch = micro_batch * world_size * accum_steps
        if start_position < 0 or start_position % self.global_batch:
            raise ValueError(
                f"start_position {start_position} is not a multiple of the global batch {self.global_batch} "
                "(micro_batch x world_size x accum_steps); resume with the same global batch as the checkpoint"
            )
        self.start_position = start_position
        self.first_micro_step = start_position // (world_size * micro_batch)

    def positions(self, number: int) -> list[int]:
        """Global positions of this rank's `number`-th micro-batch (from 0) after `start_position`."""
        return micro_batch_positions(
            self.first_micro_step + number, self.rank, self.micro_batch, self.world_size
        )

    def __iter__(self) -> Iterator[list[int]]:
        return map(self.positions, itertools.count())


def val_rank_batches(
    num_samples: int, rank: int, world_size: int, micro_batch: int
) -> list[list[tuple[int, float]]]:
    """This rank's validation batches as lists of (dataset index, weight).

    Samples go round-robin to ranks (rank r takes r, r+world, ...). Ranks with one sample fewer get a
    weight-0 copy of sample 0, so every rank runs the same number of (collective) forwards.
    """
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside world size {world_size}")
    if num_samples == 0:
        return []
    num_per_rank = math.ceil(num_samples / world_size)
    rows = [(i, 1.0) for i in range(rank, num_samples, world_size)]
    rows += [(0, 0.0)] * (num_per_rank - len(rows))
    return [rows[i : i + micro_batch] for i in range(0, num_per_rank, micro_batch)]
