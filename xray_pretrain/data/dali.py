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
from xray_pretrain.data.decode import decode_image, encode_roi_png, estimate_roi
from xray_pretrain.data.decode import image_size as encoded_image_size
from xray_pretrain.data.order import RankShare, TrainBatchSampler
from xray_pretrain.data.reports import ItemTable
from xray_pretrain.data.shards import ShardReader

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
    the batch number, never on how far the consumer has got.
    """

    def __init__(self, items: ItemTable, rows_for: RowsFor, jitter: bool):
        self.items, self.rows_for = items, rows_for
        self.outputs = GEOMETRY_OUTPUTS + (JITTER_OUTPUTS if jitter else ())
        self.reader = ShardReader()

    def __call__(self, batch_info) -> tuple[list[np.ndarray], ...]:
        columns: dict[str, list[np.ndarray]] = {name: [] for name in self.outputs}
        for row in self.rows_for(batch_info.iteration):
            inputs = self.sample_inputs(row)
            for name in self.outputs:
                columns[name].append(inputs[name])
        return tuple(columns[name] for name in self.outputs)

    def sample_inputs(self, row: Row) -> dict[str, np.ndarray]:
        sample = self.items.views[row.view].read(self.reader, row.folder, row.index)
        height, width = encoded_image_size(sample.image)
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
    ):
        self.items, self.rows_for, self.num_batches = items, rows_for, num_batches
        self.batch_size, self.image_size = batch_size, tuple(image_size)  # items per batch
        self.num_threads = max(1, num_workers)  # DALI's CPU thread pool plays the workers' part
        self.device_id = resolve_device_id(device)
        self.decode_device = "cpu" if self.device_id is None else f"gpu:{self.device_id} (mixed)"
        self.jitter = jitter

    def __iter__(self) -> Iterator[dict]:
        if self.num_batches == 0:
            return
        from nvidia.dali.plugin.pytorch import DALIGenericIterator, LastBatchPolicy

        num_views = self.items.num_views
        pipe = build_pipeline(
            HostFeed(self.items, self.rows_for, self.jitter),
            batch_size=self.batch_size * num_views,
            image_size=self.image_size,
            device_id=self.device_id,
            num_threads=self.num_threads,
        )
        pipe.build()
        outputs = DALIGenericIterator(
            [pipe], ["image", "roi", "labels"], last_batch_policy=LastBatchPolicy.PARTIAL
        )
        for number, out in enumerate(outputs):
            rows = [row for row in self.rows_for(number) if row.view == 0]  # one per item
            (dense,) = out
            image, roi = dense["image"], dense["roi"]  # (B * views, 1, H, W), views of an item adjacent
            if num_views > 1:
                image, roi = (x.reshape(len(rows), num_views, *x.shape[1:]) for x in (image, roi))
            batch = {
                "image": image,
                "roi": roi,
                "labels": dense["labels"][::num_views],
                "key": [self.items.key(row.folder, row.index) for row in rows],
                "position": torch.tensor([row.position for row in rows], dtype=torch.int64),
                "weight": torch.tensor([row.weight for row in rows], dtype=torch.float32),
            }
            if self.items.texts is not None:  # '' for padding rows, as the wds backend
                batch["report"] = [self.items.text(r.folder, r.index) if r.weight > 0 else "" for r in rows]
            yield batch


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
    )


def dali_val_batches(
    items: ItemTable,
    pairs: np.ndarray,
    rank_batches: list[list[tuple[int, float]]],
    image_size: tuple[int, int],
    num_workers: int,
    device: str,
) -> DaliBatches:
    """This rank's validation batches on DALI (no randomness; finite; re-iterable)."""
    return DaliBatches(
        items,
        ValSchedule(pairs, rank_batches, items.num_views),
        num_batches=len(rank_batches),
        batch_size=max((len(b) for b in rank_batches), default=1),
        image_size=image_size,
        num_workers=num_workers,
        device=device,
        jitter=False,
    )
