"""The global sample order, and which rank reads which position of it.

Training reads one infinite, seeded stream of samples: epoch 0's order, then epoch 1's, ... A sample's
place in that stream (its *position*) is the only data state a checkpoint stores (`samples_seen`), so
a run resumes exactly, at any world size, on either loader backend.

Epoch e has E = sum of the folders' sizes samples. Folder f (n_f samples) contributes ``counts[f]``
= c_f of them (see `epoch_counts`): its draws are rows [start_f, start_f + c_f) of the epoch's E
draws, draw j being sample pi_{e,f}(j mod n_f). A folder that must give more samples than it has thus
makes several passes, and every sample of it appears floor(c/n) or ceil(c/n) times; c < n draws a
seeded subset. Offset o of the epoch reads draw pi_e(o). (The passes may share pi_{e,f}: pi_e places
every draw uniformly, so which pass a copy came from leaves no trace in the stream.)

Every pi is a seeded bijection evaluated point by point (`seeded_permutation`: a Feistel network over
the next power of 4 with cycle walking, as Grain's and TensorFlow's `index_shuffle`), never a shuffled
array of the whole epoch: locating a position costs O(1) time and memory, so each rank computes only
the positions it reads (`RankShare`), whatever E is. Keys come from `SeedSequence([seed, tag, ...])`,
so the order depends only on (seed, folder sizes, weights): the same in every process, at every
world size. (Until 2026-12-03 each pi was a Fisher-Yates shuffle of the whole epoch, O(E) per rank;
checkpoints written before then resume at the same position of a different, equally seeded order.)

Optimizer step s consumes positions [s*G, (s+1)*G) with G = micro_batch * world_size * accum_steps.
Micro-step a of step s on rank r reads positions s*G + a*world*micro + r*micro + [0, micro), i.e.
micro-step m = s*accum + a reads m*world*micro + r*micro + [0, micro). Ranks are disjoint and together
read every position once; the stream never ends, so no rank needs padding and every rank yields the
same number of batches (the trainer stops by steps). With the same G, any (world, accum) split reads
the same samples per optimizer step.
"""

from __future__ import annotations

import functools
import itertools
import math
from collections.abc import Iterator, Sequence

import numpy as np

# Which order a checkpoint's `samples_seen` is a position of; change it whenever the order changes, so
# a resume across the change says that this epoch's remaining samples differ from the planned ones.
ORDER_VERSION = "feistel-1"  # before 2026-12-03: whole-epoch Fisher-Yates shuffles (no version saved)

# Tags keep the seeded streams independent of each other (SeedSequence([seed, tag, ...])).
TAG_EPOCH_SHUFFLE = 0
TAG_FOLDER_DRAW = 1
TAG_AUGMENT = 2
TAG_REPLACE = 3  # replacements for corrupt samples (data/badsamples.py)

# Six rounds: four already make a Feistel network a pseudo-random permutation when its round function
# is one (Luby-Rackoff); two more for the small domains, whose halves are only a few bits wide.
NUM_FEISTEL_ROUNDS = 6
# The network never works on fewer than 2 x 4 bits: with 1-bit halves only some orders of a tiny
# folder would be reachable (and those unevenly). Cycle walking then takes up to 256 / size trips.
MIN_HALF_BITS = 4
# Domains up to this size walk through a table of the network (built in ~0.2 ms), not the network
# itself: a tiny folder's walk is hundreds of trips, each one array lookup instead of ~70 operations.
MAX_TABLE_DOMAIN = 1 << 12
_MIX_1, _MIX_2 = np.uint64(0xBF58476D1CE4E5B9), np.uint64(0x94D049BB133111EB)


def seeded_rng(seed: int, tag: int, *values: int) -> np.random.Generator:
    """A generator determined only by (seed, tag, values): no global state, same in every process."""
    return np.random.Generator(np.random.PCG64(np.random.SeedSequence([seed, tag, *values])))


def feistel_keys(seed: int, tag: int, *values: int) -> np.ndarray:
    """(NUM_FEISTEL_ROUNDS,) uint64 round keys determined only by (seed, tag, values)."""
    return np.random.SeedSequence([seed, tag, *values]).generate_state(NUM_FEISTEL_ROUNDS, np.uint64)


def _mix64(z: np.ndarray) -> np.ndarray:
    """splitmix64's finalizer on uint64 arrays (wrapping arithmetic): a bijection in which every input
    bit flips about half of the output bits; the network's round function."""
    z = (z ^ (z >> np.uint64(30))) * _MIX_1
    z = (z ^ (z >> np.uint64(27))) * _MIX_2
    return z ^ (z >> np.uint64(31))


def feistel(x_N: np.ndarray, half_bits: int, keys_R: np.ndarray) -> np.ndarray:
    """The balanced Feistel network over [0, 4**half_bits) with round keys `keys_R`: a bijection of
    that domain; (N,) uint64 in, (N,) uint64 out."""
    shift, top = np.uint64(half_bits), np.uint64(64 - half_bits)
    left, right = x_N >> shift, x_N & np.uint64((1 << half_bits) - 1)
    for key in keys_R:
        left, right = right, left ^ (_mix64(right ^ key) >> top)
    return (left << shift) | right


def seeded_permutation(offsets: np.ndarray, size: int, keys_R: np.ndarray) -> np.ndarray:
    """pi(offsets) for the bijection pi of [0, size) that the round keys (`feistel_keys`) choose:
    int64, same shape as `offsets`.

    pi(o) is the first of feistel(o), feistel(feistel(o)), ... inside [0, size) (cycle walking: the
    network permutes the enclosing power of 4, so this permutes [0, size)). Cost per element: 6
    rounds of a few uint64 operations, times the walk (expected 4**half_bits / size < 4 trips for
    size > 64); memory: the output and its temporaries, nothing that grows with `size`.
    """
    offsets = np.asarray(offsets, dtype=np.int64)
    if offsets.size and (offsets.min() < 0 or offsets.max() >= size):
        raise ValueError(f"offsets outside [0, {size})")
    half_bits = max(MIN_HALF_BITS, math.ceil(max(size - 1, 1).bit_length() / 2))
    if 4**half_bits <= MAX_TABLE_DOMAIN:
        step = feistel(np.arange(4**half_bits, dtype=np.uint64), half_bits, keys_R).__getitem__
    else:
        step = functools.partial(feistel, half_bits=half_bits, keys_R=keys_R)
    out = step(offsets.astype(np.uint64))
    pending = np.flatnonzero(out >= np.uint64(size))
    while pending.size:
        out[pending] = step(out[pending])
        pending = pending[out[pending] >= np.uint64(size)]
    return out.astype(np.int64)


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
    """Maps global stream positions to (folder index, sample index within the folder's split)."""

    def __init__(self, folder_sizes: Sequence[int], weights: Sequence[float] | None, seed: int):
        if seed < 0:
            raise ValueError(f"seed must be >= 0, got {seed}")
        self.folder_sizes = [int(n) for n in folder_sizes]
        self.counts = epoch_counts(self.folder_sizes, weights)
        self.num_samples_per_epoch = sum(self.counts)
        if self.num_samples_per_epoch == 0:
            raise ValueError("the training split is empty in every shard folder")
        self.seed = seed
        self._draw_starts = np.cumsum([0, *self.counts])  # folder f's draws: [starts[f], starts[f+1])

    def locate_many(self, positions) -> tuple[np.ndarray, np.ndarray]:
        """(folder_N, index_N) int64 at global positions `positions` (N ints >= 0, any order, any
        epochs). O(N) time and memory, whatever the epoch size."""
        positions = np.asarray(positions, dtype=np.int64).ravel()
        folders, indices = np.empty_like(positions), np.empty_like(positions)
        if not positions.size:
            return folders, indices
        if positions.min() < 0:
            raise ValueError(f"stream positions are >= 0, got {positions.min()}")
        epochs, offsets = np.divmod(positions, self.num_samples_per_epoch)
        first_epoch = int(epochs.min())
        for epoch in (first_epoch + np.flatnonzero(np.bincount(epochs - first_epoch))).tolist():
            at = np.flatnonzero(epochs == epoch)
            keys = feistel_keys(self.seed, TAG_EPOCH_SHUFFLE, epoch)
            draws = seeded_permutation(offsets[at], self.num_samples_per_epoch, keys)
            folder = np.searchsorted(self._draw_starts, draws, side="right") - 1
            draws -= self._draw_starts[folder]
            for f in np.flatnonzero(np.bincount(folder)).tolist():
                mine = np.flatnonzero(folder == f)
                size = self.folder_sizes[f]
                keys = feistel_keys(self.seed, TAG_FOLDER_DRAW, epoch, f)
                draws[mine] = seeded_permutation(draws[mine] % size, size, keys)
            folders[at], indices[at] = folder, draws
        return folders, indices

    def epoch(self, epoch: int) -> tuple[np.ndarray, np.ndarray]:
        """(folder_E, index_E) int64: epoch `epoch`'s samples in stream order (O(E): tests, tools)."""
        start = epoch * self.num_samples_per_epoch
        return self.locate_many(np.arange(start, start + self.num_samples_per_epoch))

    def locate(self, position: int) -> tuple[int, int]:
        """(folder index, sample index) at global stream position `position` (>= 0)."""
        folders, indices = self.locate_many([position])
        return int(folders[0]), int(indices[0])


BLOCK_POSITIONS = 4096  # most positions a rank locates at once (one vectorized call: ~5 ms, ~0.7 MB)


class RankShare:
    """The positions one rank reads, located a block at a time, and nothing else.

    A block is the rank's next BLOCK_POSITIONS positions, or fewer so that it spans at most about one
    epoch (a block over many epochs would evaluate many small permutations one by one). It is located
    in one `GlobalOrder.locate_many` call, O(block) and never O(epoch), so the first batch costs the
    same at 10k or 10M samples per epoch. `locate` answers exactly what `GlobalOrder.locate` answers;
    asking for another rank's position is a ValueError.
    """

    def __init__(self, order: GlobalOrder, *, rank: int, world_size: int, micro_batch: int):
        if not 0 <= rank < world_size or micro_batch < 1:
            raise ValueError(f"rank {rank} outside world size {world_size}, or micro_batch {micro_batch} < 1")
        self.order, self.rank, self.world_size, self.micro_batch = order, rank, world_size, micro_batch
        micro_steps_per_epoch = order.num_samples_per_epoch // (world_size * micro_batch)
        self.micro_steps_per_block = max(1, min(BLOCK_POSITIONS // micro_batch, micro_steps_per_epoch))
        self._block = -1
        self._folders = self._indices = np.zeros(0, dtype=np.int64)

    def _locate_block(self, block: int) -> None:
        first = block * self.micro_steps_per_block
        micro_steps = np.arange(first, first + self.micro_steps_per_block, dtype=np.int64)
        starts = (micro_steps * self.world_size + self.rank) * self.micro_batch
        positions = starts[:, None] + np.arange(self.micro_batch)
        self._folders, self._indices = self.order.locate_many(positions)
        self._block = block

    def locate(self, position: int) -> tuple[int, int]:
        """(folder index, sample index) at global position `position`, one that this rank reads."""
        position = int(position)
        micro_step, within = divmod(position, self.micro_batch)
        if position < 0 or micro_step % self.world_size != self.rank:
            raise ValueError(f"position {position} is not read by rank {self.rank} of {self.world_size}")
        micro_step //= self.world_size  # this rank's micro-step number
        block, step_in_block = divmod(micro_step, self.micro_steps_per_block)
        if block != self._block:
            self._locate_block(block)
        slot = step_in_block * self.micro_batch + within
        return int(self._folders[slot]), int(self._indices[slot])


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
