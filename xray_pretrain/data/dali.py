"""The DALI backend: the host feeds encoded bytes in the global order; DALI decodes and augments.

Why `fn.external_source` and not `fn.readers.webdataset`: the reader shuffles with its own buffer and
splits by shard (`shard_id` / `num_shards`), so its order is not our global order (`order.py`), it
cannot mix folders with exact per-epoch counts, and its position cannot be resumed at another world
size. Here the host reads each position's sample through the same index (`shards.ShardReader`,
preads on descriptors kept open; no decode) and computes the same augmentation parameters and integer crop box as
the wds backend (`augment.py`); DALI does the heavy work: decoding (device="mixed" on a GPU: nvJPEG
for jpg, nvJPEG2000 for jp2, png16 on the CPU inside DALI; a CPU-only pipeline with device_id=None
where there is no GPU), crop, antialiased resize, jitter, normalization and flip. Both backends
therefore read the same samples per position, and a run can resume on either.

16-bit is kept to float: images decode as GRAY UINT16 (8-bit jpg comes out scaled by 257, so /65535
gives value/255 as the wds backend), then resize straight to float32 (the PyTorch plugin has no
uint16 anyway). The resize matches torch's antialiased bilinear to float precision except in the
outermost output rows/columns when downscaling, where DALI extends the edge pixel and torch
renormalizes the truncated filter (on the test images, 2.4x downscale: up to 1.1 8-bit grey levels
there, mean difference under 0.1 grey level over the image).

The roi mask takes the same geometry as the image: stretched to the image's size with nearest
neighbour, sliced by the same box, resized with nearest neighbour (DALI's NN samples at pixel
centres exactly as `augment.transform_roi` does), flipped with the image.

Report items with two views (`reports.py`): each item is two pipeline rows, frontal then lateral
(the pipeline's batch is micro_batch * views); the outputs are regrouped to (B, 2, 1, H, W). Report
texts never enter the pipeline: the host adds them to each batch from the same rows.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import torch

from xray_pretrain.data.augment import FULL_VIEW, AugmentParams, TrainAugment, crop_box_pixels
from xray_pretrain.data.badsamples import EvalReplacement, TrainReplacement, load_or_replace
from xray_pretrain.data.decode import decode_image, decode_roi, encode_roi_png, estimate_roi, verify_image
from xray_pretrain.data.decode import image_size as encoded_image_size
from xray_pretrain.data.order import RankShare, TrainBatchSampler
from xray_pretrain.data.reports import ItemTable
from xray_pretrain.data.shards import CorruptSample, ShardReader

FULL_SCALE_16 = 65535.0
GEOMETRY_OUTPUTS = ("encoded", "roi_encoded", "image_hw", "anchor", "shape", "flip", "mean", "std", "labels")
JITTER_OUTPUTS = ("brightness", "contrast")  # fed only when jitter is on (DALI warns about unused outputs)


@dataclass(frozen=True)
class Row:
    """One pipeline row as the host schedules it: view `view` of item `index` of `folder`."""

    folder: int
    index: int
    params: AugmentParams
    position: int
    weight: float
    view: int = 0


RowsFor = Callable[[int], list[Row]]  # batch number (from 0) -> its rows; raises StopIteration at the end


class HostFeed:
    """The external-source callback: reads one batch's samples and their per-sample parameters.

    Called by DALI ahead of consumption (prefetch) with `BatchInfo.iteration`, so it depends only on
    the batch number (`first` + iteration), never on how far the consumer has got.

    Corrupt samples (`badsamples.py`): an item one of whose views fails the host's checks
    (`SplitTable.read`, the image header, or membership of `known_bad`: items that made DALI's
    decoder fail before, see `DaliBatches`) is replaced whole as `replace` says (training: by
    position; evaluation: by the padding sample, weight 0). `fed[number]` holds what was fed per
    batch: each item's (folder, index), key and weight, and the skips.
    """

    def __init__(
        self, items: ItemTable, rows_for: RowsFor, jitter: bool, replace: TrainReplacement | EvalReplacement,
        *, first: int = 0, known_bad: dict[tuple[int, int], tuple[str, str]] | None = None,
    ):  # fmt: skip
        self.items, self.rows_for, self.replace, self.first = items, rows_for, replace, first
        self.outputs = GEOMETRY_OUTPUTS + (JITTER_OUTPUTS if jitter else ())
        self.reader = ShardReader()
        self.known_bad = known_bad if known_bad is not None else {}  # item -> (shard, key) that failed
        self.fed: dict[int, dict] = {}

    def __call__(self, batch_info) -> tuple[list[np.ndarray], ...]:
        number = self.first + batch_info.iteration
        columns: dict[str, list[np.ndarray]] = {name: [] for name in self.outputs}
        fed = {"items": [], "keys": [], "weights": [], "bad": []}
        rows = self.rows_for(number)
        for start in range(0, len(rows), self.items.num_views):  # the views of an item are adjacent
            views, (folder, index), bad = self.checked_item(rows[start : start + self.items.num_views])
            weight, bad = self.replace.settle(rows[start].weight, bad)
            fed["items"].append((folder, index))
            fed["keys"].append(self.items.key(folder, index))
            fed["weights"].append(weight)
            fed["bad"] += bad
            for inputs in views:
                for name in self.outputs:
                    columns[name].append(inputs[name])
        self.fed[number] = fed
        return tuple(columns[name] for name in self.outputs)

    def checked_item(self, rows: list[Row]) -> tuple[list[dict], tuple[int, int], list[dict]]:
        """(inputs per view, (folder, index) fed, skip records) for one item, replaced when corrupt."""

        def load(folder: int, index: int) -> tuple[list[dict], tuple[int, int]]:
            if (folder, index) in self.known_bad:
                shard, key = self.known_bad[folder, index]
                raise CorruptSample(
                    f"{shard}:{key}: image does not decode (DALI, confirmed by Pillow)", shard, key
                )
            return [self.sample_inputs(row, folder, index) for row in rows], (folder, index)

        first = rows[0]
        (views, fed), bad = load_or_replace(load, first.folder, first.index, first.position, self.replace)
        return views, fed, bad

    def sample_inputs(self, row: Row, folder: int, index: int) -> dict[str, np.ndarray]:
        """View `row.view` of item (`folder`, `index`) with `row`'s augmentation."""
        sample = self.items.views[row.view].read(self.reader, folder, index)
        try:
            height, width = encoded_image_size(sample.image)
        except Exception as error:  # Pillow raises several types for a damaged header
            raise CorruptSample(
                f"{sample.shard}:{sample.key}: image header unreadable ({type(error).__name__}: {error})",
                sample.shard,
                sample.key,
            ) from error
        roi_png = sample.roi
        if roi_png is None:  # rare (tars from elsewhere): the estimator needs the decoded image
            roi_png = encode_roi_png(estimate_roi(decode_image(sample.image)))
        top, left, crop_h, crop_w = crop_box_pixels(row.params, height, width)
        return {
            "encoded": np.frombuffer(sample.image, dtype=np.uint8),
            "roi_encoded": np.frombuffer(roi_png, dtype=np.uint8),
            "image_hw": np.array([height, width], dtype=np.float32),
            "anchor": np.array([top, left], dtype=np.int32),
            "shape": np.array([crop_h, crop_w], dtype=np.int32),
            "flip": np.array(int(row.params.flip), dtype=np.int32),
            "brightness": np.array(row.params.brightness, dtype=np.float32),
            "contrast": np.array(row.params.contrast, dtype=np.float32),
            "mean": np.array([sample.mean], dtype=np.float32),
            "std": np.array([sample.std], dtype=np.float32),
            "labels": sample.labels,
        }

    def undecodable(self, number: int) -> dict[tuple[int, int], tuple[str, str]]:
        """The items fed in batch `number` with a view that Pillow cannot decode either (after DALI
        failed on the batch): (folder, index) -> (shard, key) of that view."""
        found = {}
        for folder, index in self.fed.get(number, {}).get("items", []):
            for view in self.items.views:
                sample = view.read(self.reader, folder, index)
                try:
                    verify_image(sample.image)
                    decode_image(sample.image)
                    if sample.roi is not None:
                        decode_roi(sample.roi)
                except Exception:  # what exactly failed is DALI's message; Pillow only finds the item
                    found[folder, index] = (sample.shard, sample.key)
                    break
        return found


def build_pipeline(
    feed: HostFeed,
    *,
    batch_size: int,
    image_size: tuple[int, int],
    device_id: int | None,
    num_threads: int,
    prefetch: int = 2,
):
    """The DALI graph. Outputs image (B,1,H,W) float32, roi (B,1,H,W) uint8 0/1, labels (B,C) float32."""
    from nvidia.dali import Pipeline, fn, types

    gpu = device_id is not None
    pipe = Pipeline(
        batch_size=batch_size, num_threads=num_threads, device_id=device_id, prefetch_queue_depth=prefetch
    )
    with pipe:
        feed_nodes = fn.external_source(
            source=feed, num_outputs=len(feed.outputs), batch=True, batch_info=True
        )
        inputs = dict(zip(feed.outputs, feed_nodes))
        anchor, shape, flip = inputs["anchor"], inputs["shape"], inputs["flip"]
        decoder = "mixed" if gpu else "cpu"
        image = fn.decoders.image(
            inputs["encoded"], device=decoder, output_type=types.GRAY, dtype=types.UINT16
        )
        image = fn.slice(image, anchor, shape, axes=[0, 1])
        image = fn.resize(
            image, size=list(image_size), interp_type=types.INTERP_LINEAR, antialias=True, dtype=types.FLOAT
        )
        image = image * (1.0 / FULL_SCALE_16)
        if "brightness" in inputs:  # same formula as augment.transform_image
            brightness, contrast = inputs["brightness"], inputs["contrast"]
            if gpu:  # arithmetic needs its tensor inputs on one device
                brightness, contrast = brightness.gpu(), contrast.gpu()
            image = brightness * (0.5 + contrast * (image - 0.5))
        image = fn.crop_mirror_normalize(
            image, mean=inputs["mean"], std=inputs["std"], mirror=flip, output_layout="CHW", dtype=types.FLOAT
        )
        roi = fn.decoders.image(inputs["roi_encoded"], device="cpu", output_type=types.GRAY)
        roi = roi.gpu() if gpu else roi
        roi = fn.resize(roi, size=inputs["image_hw"], interp_type=types.INTERP_NN)
        roi = fn.slice(roi, anchor, shape, axes=[0, 1])
        roi = fn.resize(roi, size=list(image_size), interp_type=types.INTERP_NN)
        roi = fn.transpose(fn.flip(roi, horizontal=flip), perm=[2, 0, 1])
        roi = fn.cast(roi >= 128, dtype=types.UINT8)
        pipe.set_outputs(image, roi, inputs["labels"])
    return pipe


def resolve_device_id(device: str) -> int | None:
    """Device string -> DALI device_id: None for "cpu" (CPU-only pipeline), the GPU index for "cuda[:N]"."""
    if not device.startswith("cuda"):
        return None
    if not torch.cuda.is_available():
        raise ValueError(f"device {device!r} asked for, but CUDA is not available; use device='cpu'")
    index = torch.device(device).index
    return torch.cuda.current_device() if index is None else index


class DaliBatches:
    """Iterable of batch dicts (the batch contract, see `wds.py`) from a DALI pipeline.

    Every `iter()` builds a fresh pipeline and starts at batch 0 of the schedule, so a partly consumed
    iteration (e.g. one preview batch) never shifts the next one. Tensors come out on the pipeline's
    device: the GPU for device="cuda" (labels stay on the CPU), else the CPU.
    """

    def __init__(
        self,
        items: ItemTable,
        rows_for: RowsFor,
        *,
        num_batches: int | None,
        batch_size: int,
        image_size: tuple[int, int],
        num_workers: int,
        device: str,
        jitter: bool,
        replace: TrainReplacement | EvalReplacement,
    ):
        """`replace`: what a corrupt item becomes (`badsamples.py`)."""
        self.items, self.rows_for, self.num_batches, self.replace = items, rows_for, num_batches, replace
        self.batch_size, self.image_size = batch_size, tuple(image_size)  # items per batch
        self.num_threads = max(1, num_workers)  # DALI's CPU thread pool plays the workers' part
        self.device_id = resolve_device_id(device)
        self.decode_device = "cpu" if self.device_id is None else f"gpu:{self.device_id} (mixed)"
        self.jitter = jitter

    def __iter__(self) -> Iterator[dict]:
        """Batches from 0. When DALI's decoder fails on a batch (bytes that pass the host's checks
        but do not decode), the items of that batch that Pillow cannot decode either join
        `known_bad`, and a fresh pipeline restarts at that batch with them replaced (the same
        replacement the wds backend makes); a failure no item explains is raised."""
        if self.num_batches == 0:
            return
        known_bad: dict[tuple[int, int], tuple[str, str]] = {}
        number = 0
        while True:
            feed = HostFeed(
                self.items, self.rows_for, self.jitter, self.replace, first=number, known_bad=known_bad
            )
            try:
                for out in self._outputs(feed):
                    yield self._batch(out, feed.fed.pop(number), self.rows_for(number))
                    number += 1
                return
            except RuntimeError as error:
                found = {
                    item: named for item, named in feed.undecodable(number).items() if item not in known_bad
                }
                if not found:
                    keys = feed.fed.get(number, {}).get("keys")
                    raise RuntimeError(f"DALI failed on batch {number} (keys {keys}): {error}") from error
                known_bad.update(found)

    def _outputs(self, feed: HostFeed):
        from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy

        pipe = build_pipeline(
            feed,
            batch_size=self.batch_size * self.items.num_views,
            image_size=self.image_size,
            device_id=self.device_id,
            num_threads=self.num_threads,
        )
        pipe.build()
        return DALIGenericIterator(
            [pipe], ["image", "roi", "labels"], last_batch_policy=LastBatchPolicy.PARTIAL
        )

    def _batch(self, out, fed: dict, rows: list[Row]) -> dict:
        """The batch contract from one pipeline output and what the host fed for it."""
        num_views = self.items.num_views
        rows = [row for row in rows if row.view == 0]  # one per item
        (dense,) = out
        image, roi = dense["image"], dense["roi"]  # (B * views, 1, H, W), views of an item adjacent
        if num_views > 1:
            image, roi = (x.reshape(len(rows), num_views, *x.shape[1:]) for x in (image, roi))
        batch = {
            "image": image,
            "roi": roi,
            "labels": dense["labels"][::num_views],
            "key": fed["keys"],
            "position": torch.tensor([row.position for row in rows], dtype=torch.int64),
            "weight": torch.tensor(fed["weights"], dtype=torch.float32),
            "bad": fed["bad"],
        }
        if self.items.texts is not None:  # '' for padding rows, as the wds backend
            texts = [self.items.text(*item) for item in fed["items"]]
            batch["report"] = [text if weight > 0 else "" for text, weight in zip(texts, fed["weights"])]
        return batch


class TrainSchedule:
    """Batch number -> rows for one rank's training stream (positions from `order.py`)."""

    def __init__(
        self, share: RankShare, sampler: TrainBatchSampler, augment: TrainAugment, seed: int, num_views: int
    ):
        self.share, self.sampler, self.augment, self.seed = share, sampler, augment, seed
        self.num_views = num_views

    def __call__(self, number: int) -> list[Row]:
        rows = []
        for p in self.sampler.positions(number):
            folder, index = self.share.locate(p)
            for view in range(self.num_views):
                rows.append(Row(folder, index, self.augment.sample(self.seed, p, view), p, 1.0, view))
        return rows


class ValSchedule:
    """Batch number -> rows of this rank's validation batches; StopIteration after the last."""

    def __init__(self, pairs: np.ndarray, rank_batches: list[list[tuple[int, float]]], num_views: int):
        self.pairs, self.rank_batches, self.num_views = pairs, rank_batches, num_views

    def __call__(self, number: int) -> list[Row]:
        if number >= len(self.rank_batches):
            raise StopIteration
        return [
            Row(*map(int, self.pairs[i]), FULL_VIEW, i, weight, view)
            for i, weight in self.rank_batches[number]
            for view in range(self.num_views)
        ]


def dali_train_batches(
    items: ItemTable,
    share: RankShare,
    sampler: TrainBatchSampler,
    augment: TrainAugment,
    seed: int,
    image_size: tuple[int, int],
    num_workers: int,
    device: str,
) -> DaliBatches:
    """This rank's infinite training stream on DALI (same positions and augmentation as wds)."""
    return DaliBatches(
        items,
        TrainSchedule(share, sampler, augment, seed, items.num_views),
        num_batches=None,
        batch_size=sampler.micro_batch,
        image_size=image_size,
        num_workers=num_workers,
        device=device,
        jitter=augment.brightness > 0 or augment.contrast > 0,
        replace=TrainReplacement(seed, items.folder_sizes),
    )


def dali_val_batches(
    items: ItemTable,
    pairs: np.ndarray,
    rank_batches: list[list[tuple[int, float]]],
    image_size: tuple[int, int],
    num_workers: int,
    device: str,
) -> DaliBatches:
    """This rank's validation batches on DALI (no randomness; finite; re-iterable; a corrupt item
    becomes a padding row)."""
    return DaliBatches(
        items,
        ValSchedule(pairs, rank_batches, items.num_views),
        num_batches=len(rank_batches),
        batch_size=max((len(b) for b in rank_batches), default=1),
        image_size=image_size,
        num_workers=num_workers,
        device=device,
        jitter=False,
        replace=EvalReplacement(pairs),
    )
