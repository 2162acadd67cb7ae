"""Shard plan, shard writing and the per-shard state that makes a conversion resumable.

Every record is assigned to a shard before any decoding: records are grouped by split (train, val,
test), ordered by key inside a split and cut into runs of `shard_size`. A shard is written in one go
(`ShardBuilder`: tar + DALI idx via shardio.ShardTarWriter, atomic rename) and then its state file
`.xray-shard/shards/<name>.json` records what it holds: sample count, bytes, sha256, exact pixel
sums, label counts, the records that were skipped, and id-map rows. A rerun loads the states of the
shards that are complete (state present, tar and idx on disk with the recorded size) and writes
only the others, so an interrupted run finishes with the same bytes as an uninterrupted one.
A shard whose records were all skipped writes no tar (its state says num_samples 0).
"""

from __future__ import annotations

import hashlib
import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

from data_tools.manifest import count_label, empty_label_counts, write_atomic
from data_tools.records import SPLITS, Record
from xray_core.shardio import ShardTarWriter, idx_path_for, shard_name

STATE_DIR = ".xray-shard"
PLAN_NAME = "plan.json"


@dataclass
class PlannedShard:
    """A shard's place in the plan and the records assigned to it (ordered by key)."""

    name: str
    split: str
    index: int
    items: list[tuple[str, Record]]  # (key, record)


def plan_shards(
    items_by_split: dict[str, list[tuple[str, Record]]], dataset: str, shard_size: int
) -> list[PlannedShard]:
    """Cut each split's (key, record) list, sorted by key, into shards of `shard_size` records."""
    assert shard_size >= 1, shard_size
    plan = []
    for split in SPLITS:
        items = sorted(items_by_split.get(split, []), key=lambda item: item[0])
        for index, start in enumerate(range(0, len(items), shard_size)):
            plan.append(
                PlannedShard(
                    shard_name(dataset, split, index), split, index, items[start : start + shard_size]
                )
            )
    return plan


@dataclass
class ShardState:
    """What a finished shard holds; enough to rebuild the manifest without reading the tar."""

    name: str
    split: str
    num_samples: int = 0
    num_bytes: int = 0
    sha256: str = ""
    pixel_sum: int = 0
    pixel_sumsq: int = 0
    num_pixels: int = 0
    label_counts: dict = field(default_factory=dict)
    skipped: list[dict] = field(default_factory=list)
    id_rows: list[list[str]] = field(default_factory=list)
    pixel_hashes: list[list[str]] = field(default_factory=list)  # [hash, key] with --dedup
    cpu_seconds: dict[str, float] = field(default_factory=dict)
    roi_paths: dict[str, int] = field(default_factory=dict)  # chest-region path -> samples

    @classmethod
    def from_json(cls, data: dict) -> ShardState:
        return cls(**data)


def sha256_file(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


class ShardBuilder:
    """Collects one shard's samples and skips; `finish` writes tar + idx + state."""

    def __init__(self, out_dir: Path, shard: PlannedShard, label_names: list[str]):
        self.out_dir = out_dir
        self.shard = shard
        self.state = ShardState(shard.name, shard.split, label_counts=empty_label_counts(label_names))
        self._tar: ShardTarWriter | None = None

    def add_sample(self, sample) -> None:
        """`sample`: a data_tools.encode.Sample."""
        if self._tar is None:  # opened on the first sample: a shard of only skips writes no tar
            self._tar = ShardTarWriter(self.out_dir / self.shard.name)
        self._tar.write_sample(sample.key, sample.components)
        state = self.state
        state.num_samples += 1
        state.pixel_sum += sample.pixel_sum
        state.pixel_sumsq += sample.pixel_sumsq
        state.num_pixels += sample.num_pixels
        count_label(state.label_counts, sample.labels)
        state.id_rows.append(list(sample.id_row))
        if sample.pixel_hash:
            state.pixel_hashes.append([sample.pixel_hash, sample.key])
        state.roi_paths[sample.roi_path] = state.roi_paths.get(sample.roi_path, 0) + 1
        for stage, seconds in sample.cpu_seconds.items():
            state.cpu_seconds[stage] = state.cpu_seconds.get(stage, 0.0) + seconds

    def add_skip(self, source_id: str, dataset: str, reason: str) -> None:
        self.state.skipped.append({"source_id": source_id, "dataset": dataset, "reason": reason})

    def finish(self, store: StateStore) -> ShardState:
        """Close the tar (idx written, atomic rename), hash it, save the state (CPU time -> "write")."""
        started = time.process_time()
        if self._tar is not None:
            self._tar.close()
            self.state.num_bytes = self._tar.num_bytes
            self.state.sha256 = self._tar.sha256  # hashed while writing: no second read of the tar
        seconds = self.state.cpu_seconds
        seconds["write"] = seconds.get("write", 0.0) + time.process_time() - started
        store.save(self.state)
        return self.state

    def abort(self) -> None:
        if self._tar is not None:
            self._tar.abort()


class StateStore:
    """The `.xray-shard/` folder: the plan fingerprint and one state file per finished shard."""

    def __init__(self, out_dir: Path):
        self.out_dir = Path(out_dir)
        self.root = self.out_dir / STATE_DIR
        self.shards_dir = self.root / "shards"

    def begin(self, fingerprint: str) -> None:
        """Create the folder, or check that it belongs to the same plan; remove leftover partial files."""
        plan_path = self.root / PLAN_NAME
        if plan_path.is_file():
            found = json.loads(plan_path.read_text()).get("fingerprint")
            if found != fingerprint:
                raise ValueError(
                    f"{self.out_dir} holds a conversion with other inputs or options (plan {found}, "
                    f"this run {fingerprint}); use a new --out folder or delete {self.out_dir}"
                )
        self.shards_dir.mkdir(parents=True, exist_ok=True)
        write_atomic(plan_path, json.dumps({"fingerprint": fingerprint}).encode())
        for leftover in list(self.out_dir.glob("*.partial")) + list(self.shards_dir.glob("*.partial")):
            leftover.unlink()

    def load_complete(self, shard: PlannedShard) -> ShardState | None:
        """The state of a shard that is fully on disk, or None if it must be (re)written."""
        path = self.shards_dir / f"{shard.name}.json"
        if not path.is_file():
            return None
        state = ShardState.from_json(json.loads(path.read_text()))
        if state.num_samples == 0:
            return state
        tar_path = self.out_dir / shard.name
        if not tar_path.is_file() or tar_path.stat().st_size != state.num_bytes:
            return None
        return state if idx_path_for(tar_path).is_file() else None

    def save(self, state: ShardState) -> None:
        write_atomic(self.shards_dir / f"{state.name}.json", json.dumps(asdict(state)).encode())
