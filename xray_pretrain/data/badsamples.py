"""Corrupt samples inside shards: skipped where they are read, replaced by position, counted, bounded.

A sample whose stored bytes are unusable (`shards.CorruptSample`: a tar cut short, an idx entry that
does not point at its member, labels.npy of the wrong shape, a missing or unparsable json, an image
that does not decode) is skipped by the backend that reads it (wds worker or DALI host feed), and
its slot in the batch is filled by a replacement that depends on nothing but the row, so both
backends, any world size and a resumed run read the same batches:

- training (`TrainReplacement`): a sample drawn from the same folder by a generator seeded with
  (seed, position, attempt), so the global batch keeps its size. The batch row keeps the position's
  augmentation; its `key` is the replacement's.
- evaluation (`EvalReplacement`: validation, test, `evaluate`): the row becomes a padding row, the
  same weight-0 copy of the first validation sample that pads the ranks' last batches, so every
  collective, loss and gathered prediction drops it as it drops padding: no other sample stands in
  for it in the metrics, and it is not dropped silently: the skip is reported.

Each skip travels with its batch as a record (`batch["bad"]`: position, shard, key, reason) to the
consuming process. Training: `BadSampleTally` logs one line per skip naming shard and key and counts
them; the engine sums the counts over ranks every step (TensorBoard `data/bad_samples`, the run
summary's `num_bad_samples`) and stops the run once they exceed `data.max_bad_fraction`
(`exceeded`). Evaluation: `ValLoader` logs one line per skipped sample and keeps the pass's records;
the evaluation's metrics carry them over all ranks (`skipped_metrics`: `num_skipped`, `skipped`),
and more of them than `data.max_bad_fraction` of the split stops the evaluation (`check_eval_skips`).
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import TypeVar

from xray_pretrain.data.order import TAG_REPLACE, seeded_rng
from xray_pretrain.data.shards import CorruptSample

log = logging.getLogger(__name__)

MAX_ATTEMPTS = 16  # replacements tried for one position before the run stops (all of them corrupt)
Item = TypeVar("Item")


def replacement_index(seed: int, position: int, attempt: int, folder_size: int) -> int:
    """Sample index (within the same folder) that replaces the `attempt`-th corrupt read at `position`."""
    return int(seeded_rng(seed, TAG_REPLACE, position, attempt).integers(folder_size))


@dataclass(frozen=True)
class TrainReplacement:
    """Training: a seeded draw from the corrupt sample's folder; the row keeps counting."""

    seed: int
    folder_sizes: Sequence[int]

    def __call__(self, position: int, folder: int, attempt: int) -> tuple[int, int]:
        return folder, replacement_index(self.seed, position, attempt, self.folder_sizes[folder])

    def settle(self, weight: float, bad: list[dict]) -> tuple[float, list[dict]]:
        return weight, bad


@dataclass(frozen=True)
class EvalReplacement:
    """Evaluation: the padding sample (validation item 0, the next one when that is corrupt too),
    with weight 0, so that metrics leave the row out exactly as they leave out padding."""

    pairs: Sequence  # (n, 2) (folder, index) of the validation list, in its order

    def __call__(self, position: int, folder: int, attempt: int) -> tuple[int, int]:
        replacement = self.pairs[attempt % len(self.pairs)]
        return int(replacement[0]), int(replacement[1])

    def settle(self, weight: float, bad: list[dict]) -> tuple[float, list[dict]]:
        """(row weight, skips to report): only the row's own sample (the first record), and only from
        a real row. A corrupt padding sample met as a replacement, or in a padding row, is reported
        once, at its own real row."""
        if weight == 0:
            return 0.0, []
        return (0.0 if bad else weight), bad[:1]


def load_or_replace(
    load: Callable[[int, int], Item],
    folder: int,
    index: int,
    position: int,
    replace: Callable[[int, int, int], tuple[int, int]],
) -> tuple[Item, list[dict]]:
    """(`load(folder, index)`, []) or, when that raises `CorruptSample`, the first replacement
    `replace(position, folder, attempt)` that loads, with one record per corrupt sample met. Raises
    CorruptSample after MAX_ATTEMPTS replacements."""
    bad: list[dict] = []
    for attempt in range(MAX_ATTEMPTS + 1):
        try:
            return load(folder, index), bad
        except CorruptSample as error:
            reason = str(error).split(f"{error.key}: ", 1)[-1] if error.key else str(error)  # once
            if all(record["key"] != error.key for record in bad):  # a draw may repeat in a small folder
                bad.append(
                    {"position": int(position), "shard": error.shard, "key": error.key, "reason": reason}
                )
            folder, index = replace(position, folder, attempt)
    raise CorruptSample(
        f"position {position}: the sample and {MAX_ATTEMPTS} replacements are all corrupt, the last: "
        f"{bad[-1]['reason']}; check the folder with `xray-shard verify`",
        bad[-1]["shard"],
        bad[-1]["key"],
    )


class BadSampleTally:
    """This rank's skipped samples, taken from the batches as the trainer consumes them."""

    def __init__(self):
        self.num_bad = 0  # skips seen by this process
        self.num_reported = 0  # of which already handed to `take_new`
        self.last: dict | None = None  # the latest record (names shard and key in a stop message)

    def watch(self, batches: Iterable[dict]) -> Iterator[dict]:
        """The batches, each with its "bad" records logged and counted (and removed from the batch)."""
        for batch in batches:
            for record in batch.pop("bad", None) or []:
                self.note(record, batch)
            yield batch

    def note(self, record: dict, batch: dict) -> None:
        positions = [int(p) for p in batch["position"]]
        row = positions.index(record["position"]) if record["position"] in positions else None
        replacement = batch["key"][row] if row is not None else "?"
        log.warning(
            "corrupt sample skipped: %s:%s at position %d, replaced by %s (%s)",
            record["shard"], record["key"], record["position"], replacement, record["reason"],
        )  # fmt: skip
        self.num_bad += 1
        self.last = record

    def take_new(self) -> int:
        """Skips since the previous call."""
        num_new, self.num_reported = self.num_bad - self.num_reported, self.num_bad
        return num_new


def exceeded(num_bad: int, samples_read: int, samples_per_epoch: int, max_fraction: float) -> bool:
    """True when `num_bad` skips (all ranks, whole run) exceed `max_fraction` of the samples read, counted
    as at least one epoch: early in a run one bad sample in the first batch is not yet a fraction."""
    return num_bad > max_fraction * max(samples_read, samples_per_epoch)


def stop_message(num_bad: int, samples_read: int, max_fraction: float, last: dict | None) -> str:
    named = f"; the last: {last['shard']}:{last['key']} ({last['reason']})" if last else ""
    return (
        f"{num_bad} corrupt samples skipped in {samples_read} read, more than data.max_bad_fraction="
        f"{max_fraction} allows{named}. `xray-shard verify FOLDER` lists every damaged sample: re-convert "
        "or repair those shards, or raise data.max_bad_fraction"
    )


def warn_eval_skip(record: dict) -> None:
    log.warning(
        "corrupt evaluation sample skipped: %s:%s (item %d of the split), left out of the metrics (%s)",
        record["shard"], record["key"], record["position"], record["reason"],
    )  # fmt: skip


class TooManySkipped(ValueError):
    """An evaluation split with more corrupt samples than `data.max_bad_fraction` allows: its metrics
    would describe a different set of samples than the split's."""


def check_eval_skips(skipped: dict, num_samples: int, max_fraction: float, split: str) -> None:
    """Raise `TooManySkipped` when an evaluation's skips (`skipped_metrics`, every rank's) exceed
    `max_fraction` of the split's `num_samples` (every sample, the corrupt ones included). The same
    bound as training's (`exceeded`): a model is never selected, nor a test score reported, on a split
    that silently shrank."""
    num_skipped = skipped["num_skipped"]
    if not exceeded(num_skipped, num_samples, num_samples, max_fraction):
        return
    first = skipped["skipped"][0]
    raise TooManySkipped(
        f"{num_skipped} of the {num_samples} samples of the {split!r} split are corrupt (the first: "
        f"{first['shard']}:{first['key']}, {first['reason']}), more than data.max_bad_fraction={max_fraction} "
        "allows for metrics of that split. `xray-shard verify FOLDER` lists every damaged sample: "
        "re-convert or repair those shards, or raise data.max_bad_fraction"
    )


def skipped_metrics(records: Iterable[dict]) -> dict:
    """An evaluation's skips (every rank's records) for its metrics: `num_skipped` and `skipped`
    (shard, key, reason of each, in split order)."""
    ordered = sorted(records, key=lambda record: record["position"])
    return {
        "num_skipped": len(ordered),
        "skipped": [{name: record[name] for name in ("shard", "key", "reason")} for record in ordered],
    }
