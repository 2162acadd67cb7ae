"""Build the training and validation loaders, choosing the backend (DALI or the CPU `wds` loader).

Both backends read the same global order (`order.py`), apply the same augmentation parameters
(`augment.py`) and yield the same batch contract (see `wds.py`), so a run can resume on the other
backend. `data.backend=auto` picks DALI when it imports, else wds; the choice and the decode device
are logged.

`reports` (a `ReportSpec`, given for a report task): the loaders order and read report items (one
image with a report, or a study's frontal + lateral pair; `reports.py`) instead of samples, and
every batch carries `report`, the items' texts (see `wds.py` for the batch contract).
"""

from __future__ import annotations

import logging
from collections import Counter
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field

from xray_pretrain.data.augment import TrainAugment
from xray_pretrain.data.badsamples import BadSampleTally, warn_eval_skip
from xray_pretrain.data.config import DataConfig, dali_available
from xray_pretrain.data.order import (
    GlobalOrder,
    RankShare,
    TrainBatchSampler,
    located_batches,
    val_rank_batches,
)
from xray_pretrain.data.reports import ItemTable, ReportSpec, report_items
from xray_pretrain.data.shards import ShardFolder, SplitTable, open_folders, union_label_names

log = logging.getLogger(__name__)


def resolve_backend(requested: str, device: str) -> str:
    """`auto`: DALI when it imports and batches go to a GPU (GPU decode is why DALI exists); on
    CPU-only machines wds, which measured faster than DALI's CPU pipeline (benchmarks/RESULTS.md:
    DALI-CPU costs 1.16x / 1.43x / 1.03x wds's CPU time per 1280-px png16 / jpg / jp2 image)."""
    if requested == "auto":
        return "dali" if dali_available() and device.startswith("cuda") else "wds"
    return requested


def train_augment(cfg: DataConfig) -> TrainAugment:
    return TrainAugment(
        crop_scale=(float(cfg.crop_scale[0]), float(cfg.crop_scale[1])),
        crop_ratio=(float(cfg.crop_ratio[0]), float(cfg.crop_ratio[1])),
        hflip=bool(cfg.hflip),
        brightness=float(cfg.brightness),
        contrast=float(cfg.contrast),
    )


def open_train_and_val(cfg: DataConfig) -> tuple[list[ShardFolder], list[ShardFolder], list[str]]:
    """(train folders, val folders, label names), each distinct folder opened (manifest read) once.

    Both loaders use the same label order, so batches of either line up: the union over
    data.shards, then labels only data.val_shards have.
    """
    train_paths, val_paths = list(cfg.shards), cfg.resolved_val_shards
    folders = open_folders(train_paths + val_paths)
    num_train = len(train_paths)
    return folders[:num_train], folders[num_train:], union_label_names(folders)


@dataclass
class TrainLoader:
    """Infinite iterable of training batches for one rank.

    Every `iter()` starts again at `start_position` (the checkpoint's samples_seen); the trainer
    takes `next()` once per micro-step and stops by steps.
    """

    batches: Iterable[dict]
    label_names: list[str]
    num_samples_per_epoch: int
    backend: str
    decode_device: str
    intensity: list[dict]  # per folder: {"folder", "mean", "std", "image_format"}
    conversion: dict  # the first folder's `xray-shard convert` options (what preprocessing did)
    global_batch: int
    start_position: int
    report_counts: dict | None = None  # report task: items, and images left out and why (`reports.py`)
    bad: BadSampleTally = field(default_factory=BadSampleTally)  # corrupt samples this rank skipped

    def __iter__(self) -> Iterator[dict]:
        return self.bad.watch(self.batches)


@dataclass
class ValLoader:
    """Finite, re-iterable validation batches for one rank (same number of batches on every rank).

    Corrupt samples come as padding rows (weight 0, `badsamples.EvalReplacement`); their records are
    taken out of the batches, logged (once per loader) and kept in `skipped` for the latest pass, for
    the evaluation's metrics (`badsamples.skipped_metrics` over all ranks)."""

    batches: Iterable[dict]
    label_names: list[str]
    num_samples: int  # real (weight 1) samples over all ranks
    num_batches: int
    backend: str
    decode_device: str
    report_counts: dict | None = None  # report task: items, and images left out and why (`reports.py`)
    skipped: list[dict] = field(default_factory=list)  # this rank's corrupt samples in the latest pass
    warned: set[str] = field(default_factory=set)  # keys already logged

    def __iter__(self) -> Iterator[dict]:
        self.skipped = []
        return self._taking_skips(self.skipped)

    def _taking_skips(self, skipped: list[dict]) -> Iterator[dict]:
        for batch in self.batches:
            for record in batch.pop("bad", None) or []:
                if record["key"] not in self.warned:
                    warn_eval_skip(record)
                    self.warned.add(record["key"])
                skipped.append(record)
            yield batch

    def __len__(self) -> int:
        return self.num_batches


@dataclass
class _Located:
    """Re-iterable batch sampler of (position, folder, index) rows (see `order.located_batches`)."""

    sampler: TrainBatchSampler
    share: RankShare

    def __iter__(self) -> Iterator[list[tuple[int, int, int]]]:
        return located_batches(self.sampler, self.share)


def chest_region_shares(folders: list[ShardFolder], split: str) -> str:
    """Share of `split`'s samples on each chest-region path ("fitted", "rectangle (unsure)", ...), from
    the per-shard counts `xray-shard convert` / `refresh-roi` write into each manifest."""
    counts = Counter()
    for folder in folders:
        for entry in folder.manifest["shards"]:
            if entry["split"] == split:
                counts.update(entry.get("roi_paths") or {"not recorded (old shards)": entry["num_samples"]})
    total = sum(counts.values())
    return ", ".join(f"{path} {100 * n / total:.1f}%" for path, n in counts.most_common()) or "no samples"


def build_train_loader(
    cfg: DataConfig,
    *,
    image_size: tuple[int, int],
    micro_batch: int,
    accum_steps: int,
    rank: int,
    world_size: int,
    seed: int,
    start_position: int = 0,
    device: str = "cpu",
    select: Callable[[SplitTable], SplitTable] | None = None,
    reports: ReportSpec | None = None,
) -> TrainLoader:
    """This rank's infinite training stream (see `order.py` for which positions it reads).

    `select`: restricts the training table (e.g. a task's label fraction); it must be deterministic,
    since every rank calls it. `reports`: read report items with their text (module docstring)."""
    cfg.validate()
    backend = resolve_backend(cfg.backend, device)
    train_folders, _val_folders, label_names = open_train_and_val(cfg)
    table = SplitTable(train_folders, cfg.train_split, label_names)
    if select is not None:
        table = select(table)
    items = item_table(table, reports)
    if sum(items.folder_sizes) == 0:
        raise ValueError(
            f"no {cfg.train_split!r} samples{' with a report' if reports else ''} in {cfg.shards}; "
            "check data.shards and data.train_split"
        )
    order = GlobalOrder(items.folder_sizes, cfg.weights, seed)
    sampler = TrainBatchSampler(
        rank=rank,
        world_size=world_size,
        micro_batch=micro_batch,
        accum_steps=accum_steps,
        start_position=start_position,
    )
    share = RankShare(order, rank=rank, world_size=world_size, micro_batch=micro_batch)
    augment = train_augment(cfg)
    if backend == "wds":
        from xray_pretrain.data.wds import TrainDataset, make_dataloader

        dataset = TrainDataset(items, augment, seed, image_size)
        rows = _Located(sampler, share)
        batches = make_dataloader(dataset, rows, cfg.num_workers, pin_memory=device.startswith("cuda"))
        decode_device = "cpu"
    else:
        from xray_pretrain.data.dali import dali_train_batches

        batches = dali_train_batches(
            items, share, sampler, augment, seed, image_size, cfg.num_workers, device
        )
        decode_device = batches.decode_device
    log.info(
        "train data: backend %s, decode on %s, %d folder(s), %d samples per epoch, global batch %d, start %d",
        backend, decode_device, len(table.folders), order.num_samples_per_epoch, sampler.global_batch, start_position,
    )  # fmt: skip
    log.info(
        "train chest region (mask.strategy=context masks it): %s",
        chest_region_shares(table.folders, cfg.train_split),
    )
    return TrainLoader(
        batches=batches,
        label_names=table.label_names,
        num_samples_per_epoch=order.num_samples_per_epoch,
        backend=backend,
        decode_device=decode_device,
        intensity=table.intensities(),
        conversion=dict(table.folders[0].manifest.get("options") or {}),
        global_batch=sampler.global_batch,
        start_position=start_position,
        report_counts=items.counts if reports else None,
    )


def build_val_loader(
    cfg: DataConfig,
    *,
    image_size: tuple[int, int],
    micro_batch: int,
    rank: int,
    world_size: int,
    device: str = "cpu",
    whole_split: bool = False,
    split: str | None = None,
    reports: ReportSpec | None = None,
) -> ValLoader:
    """The first data.val_num_samples (`whole_split`: all) samples of `split` (default
    data.val_split) of the validation folders, in sorted-key order, split round-robin over ranks and
    padded with weight-0 rows so every rank runs the same number of batches. No randomness.
    `reports`: report items (ordered by their first image's key) with their text instead of samples;
    padding rows carry an empty text."""
    cfg.validate()
    backend = resolve_backend(cfg.backend, device)
    _train_folders, val_folders, label_names = open_train_and_val(cfg)
    items = item_table(SplitTable(val_folders, split or cfg.val_split, label_names), reports)
    table = items.table
    pairs = table.first_by_key(sum(table.folder_sizes) if whole_split else cfg.val_num_samples)
    if not whole_split and len(pairs) < cfg.val_num_samples:
        log.warning(
            "data.val_num_samples=%d but the %r split has %d samples: validating on %d",
            cfg.val_num_samples, cfg.val_split, len(pairs), len(pairs),
        )  # fmt: skip
    rank_batches = val_rank_batches(len(pairs), rank, world_size, micro_batch)
    if backend == "wds":
        from xray_pretrain.data.wds import ValDataset, make_dataloader

        dataset = ValDataset(items, pairs, image_size)
        batches = make_dataloader(
            dataset, rank_batches, cfg.num_workers, pin_memory=device.startswith("cuda")
        )
        decode_device = "cpu"
    else:
        from xray_pretrain.data.dali import dali_val_batches

        batches = dali_val_batches(items, pairs, rank_batches, image_size, cfg.num_workers, device)
        decode_device = batches.decode_device
    return ValLoader(
        batches, table.label_names, len(pairs), len(rank_batches), backend, decode_device,
        report_counts=items.counts if reports else None,
    )  # fmt: skip


def item_table(table: SplitTable, reports: ReportSpec | None) -> ItemTable:
    """What the loaders order: the samples themselves, or (report task) the report items."""
    return ItemTable([table]) if reports is None else report_items(table, reports)
