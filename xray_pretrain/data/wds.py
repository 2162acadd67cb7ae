"""The CPU backend: torch DataLoader over global positions, Pillow decode, torch resize.

Reads WebDataset-format shards by random access through their idx files (not by streaming), so the
order is `order.GlobalOrder`'s exactly. The Dataset is map-style: an item is one (global position,
folder, index) row (train; located by `order.RankShare` in the training process, so workers hold no
order) or one (index, weight) row (validation); the batch sampler decides which positions this rank
reads. Each worker opens its own tar descriptors lazily (after the fork) and keeps them open.

Batch contract (both backends): `image` float32 (B, 1, H, W) normalized; `roi` uint8 (B, 1, H, W)
0/1; `labels` float32 (B, C) NaN unknown; `key` list[str]; `position` int64 (B,) global stream
positions (validation: index in the sorted validation list); `weight` float32 (B,) 1.0, 0.0 for
validation padding rows and for evaluation samples skipped as corrupt; `bad` list[dict] samples
skipped as corrupt (`badsamples.py`), removed from the batch by the train and validation loaders.

Report task (`loader.py`'s `reports`): rows are report items; `report` list[str] (B) of the items'
texts (`report.studies.report_text` of `report.section`), '' for padding rows. With
`report.views=2`, `image` float32 (B, 2, 1, H, W) and `roi` uint8 (B, 2, 1, H, W), frontal then
lateral, each view with its own crop (`TrainAugment.sample(..., view=v)`); `labels` and `key` are the
frontal image's.
"""

from __future__ import annotations

import atexit
import multiprocessing
import signal

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from xray_pretrain.data.augment import FULL_VIEW, AugmentParams, TrainAugment, transform_sample
from xray_pretrain.data.badsamples import EvalReplacement, TrainReplacement, load_or_replace
from xray_pretrain.data.decode import decode_image, decode_roi, estimate_roi, verify_image
from xray_pretrain.data.reports import ItemTable
from xray_pretrain.data.shards import CorruptSample, ShardReader, SplitTable


def load_item(
    table: SplitTable,
    reader: ShardReader,
    folder: int,
    index: int,
    params: AugmentParams,
    image_size: tuple[int, int],
) -> dict:
    """Read, decode and transform one sample into its batch row (no batch dimension)."""
    sample = table.read(reader, folder, index)
    try:
        verify_image(sample.image)
        image_HW = decode_image(sample.image)
        roi_hw = decode_roi(sample.roi) if sample.roi is not None else None
    except Exception as error:  # Pillow raises OSError, SyntaxError, ValueError ... for damaged bytes
        raise CorruptSample(
            f"{sample.shard}:{sample.key}: image or roi.png does not decode ({type(error).__name__}: {error})",
            sample.shard,
            sample.key,
        ) from error
    roi_hw = roi_hw if roi_hw is not None else estimate_roi(image_HW)
    image_1HW, roi_1HW = transform_sample(image_HW, roi_hw, params, image_size, sample.mean, sample.std)
    return {"image": image_1HW, "roi": roi_1HW, "labels": sample.labels, "key": sample.key}


def load_row(
    items: ItemTable,
    reader: ShardReader,
    folder: int,
    index: int,
    params: list[AugmentParams],
    image_size: tuple[int, int],
) -> dict:
    """One batch row of `items`: its view(s) (params[v] for view v) and, for a report task, its text."""
    views = [load_item(t, reader, folder, index, p, image_size) for t, p in zip(items.views, params)]
    row = views[0]
    if items.num_views > 1:
        row = {
            **row,
            "image": torch.stack([v["image"] for v in views]),
            "roi": torch.stack([v["roi"] for v in views]),
        }
    if items.texts is not None:
        row["report"] = items.text(folder, index)
    return row


class TrainDataset(Dataset):
    """Map-style dataset over located stream rows (global position, folder, index)."""

    def __init__(self, items: ItemTable, augment: TrainAugment, seed: int, image_size: tuple[int, int]):
        self.items, self.augment = items, augment
        self.seed, self.image_size = seed, tuple(image_size)
        self.replace = TrainReplacement(seed, items.folder_sizes)
        self.reader = ShardReader()

    def __getitem__(self, row: tuple[int, int, int]) -> dict:
        """A corrupt sample is replaced by position (`badsamples.load_or_replace`) and reported in "bad"."""
        position, folder, index = row
        params = [self.augment.sample(self.seed, position, view) for view in range(self.items.num_views)]
        item, bad = load_or_replace(  # a report item is replaced whole (all its views)
            lambda f, i: load_row(self.items, self.reader, f, i, params, self.image_size),
            folder, index, position, self.replace,
        )  # fmt: skip
        return {**item, "position": int(position), "weight": 1.0, "bad": bad}


class ValDataset(Dataset):
    """Map-style dataset over rows (index into `pairs`, weight); no randomness. A corrupt item becomes
    a padding row (`badsamples.EvalReplacement`) and is reported in "bad"."""

    def __init__(self, items: ItemTable, pairs: np.ndarray, image_size: tuple[int, int]):
        """`pairs`: (n, 2) int (folder, index) rows in validation order."""
        self.items, self.pairs, self.image_size = items, pairs, tuple(image_size)
        self.replace = EvalReplacement(pairs)
        self.reader = ShardReader()

    def __len__(self) -> int:
        return len(self.pairs)

    def __getitem__(self, row: tuple[int, float]) -> dict:
        index, weight = row
        folder, sample = self.pairs[index]
        params = [FULL_VIEW] * self.items.num_views
        item, bad = load_or_replace(
            lambda f, i: load_row(self.items, self.reader, f, i, params, self.image_size),
            folder, sample, index, self.replace,
        )  # fmt: skip
        weight, bad = self.replace.settle(weight, bad)
        if "report" in item and weight == 0:  # padding rows carry no text
            item["report"] = ""
        return {**item, "position": int(index), "weight": float(weight), "bad": bad}


def collate(items: list[dict]) -> dict:
    """Stack batch rows into the batch contract (see the module docstring)."""
    batch = {
        "image": torch.stack([it["image"] for it in items]),
        "roi": torch.stack([it["roi"] for it in items]),
        "labels": torch.from_numpy(np.stack([it["labels"] for it in items])),
        "key": [it["key"] for it in items],
        "position": torch.tensor([it["position"] for it in items], dtype=torch.int64),
        "weight": torch.tensor([it["weight"] for it in items], dtype=torch.float32),
        "bad": [record for it in items for record in it.get("bad", ())],  # see data/badsamples.py
    }
    if "report" in items[0]:
        batch["report"] = [it["report"] for it in items]
    return batch


def _ignore_stop_signals(_worker_id: int) -> None:
    """Workers leave SIGTERM/SIGUSR1 to the training process. Slurm signals every process of a job:
    a worker dying of it would make the DataLoader raise before the ranks' agreed checkpoint
    (engine/preempt.py). Workers still end with the training process (torch watches the parent)."""
    for signum in (signal.SIGTERM, signal.SIGUSR1):
        signal.signal(signum, signal.SIG_IGN)


def _kill_workers_at_exit() -> None:
    """Python's exit ends daemonic children (DataLoader workers) with SIGTERM and waits for them.
    These ignore SIGTERM, and a DataLoader still referenced at exit (the traceback of an uncaught
    error holds its frames) would make that wait endless: SIGKILL them first (atexit runs this
    before multiprocessing's own handler, registered earlier). torch's SIGCHLD handler would report
    each of these deaths as a worker failure (a traceback after the run's own error line): at exit
    they are intended, so it is reset first."""
    workers = [child for child in multiprocessing.active_children() if child.daemon]
    if not workers:
        return
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    for child in workers:
        child.kill()
    for child in workers:
        child.join(timeout=10)


def make_dataloader(dataset: Dataset, batch_sampler, num_workers: int, pin_memory: bool) -> DataLoader:
    """A DataLoader that keeps its workers (persistent) and returns batches in sampler order."""
    if num_workers > 0:
        atexit.unregister(_kill_workers_at_exit)  # once, however many loaders
        atexit.register(_kill_workers_at_exit)
    return DataLoader(
        dataset,
        batch_sampler=batch_sampler,
        num_workers=num_workers,
        collate_fn=collate,
        pin_memory=pin_memory,
        persistent_workers=num_workers > 0,
        worker_init_fn=_ignore_stop_signals if num_workers > 0 else None,
        prefetch_factor=2 if num_workers > 0 else None,
    )
