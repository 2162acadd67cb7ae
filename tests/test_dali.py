"""The DALI backend (CPU-only pipelines here): same pixels as wds, 16-bit kept, backend choice.

Order, resume, rank and mixing behaviour shared with wds is tested for both backends in
test_loader.py.
"""

from __future__ import annotations

import itertools
import logging

import numpy as np
import pytest
import torch
from data_fixtures import EXTENSION, damage_member, needs_dali, write_shard_folder

from xray_pretrain.data.config import DataConfig
from xray_pretrain.data.loader import build_train_loader, build_val_loader, resolve_backend
from xray_pretrain.data.shards import ShardFolder

pytestmark = needs_dali
GREY_LEVEL = 1 / 255  # one 8-bit grey level, in fractions of full scale
# Outermost output rows/cols when downscaling: DALI extends the edge pixel, torch renormalizes the
# truncated filter. On the fixture's images (2.4x downscale) that is at most 1.1 grey levels.
BORDER_TOLERANCE = 2 * GREY_LEVEL


def val_batches(cfg: DataConfig, image_size, micro=3, rank=0, world=1) -> list[dict]:
    return list(build_val_loader(cfg, image_size=image_size, micro_batch=micro, rank=rank, world_size=world))


def val_loaders_of_both_backends(folder, image_size) -> dict:
    """{"wds": loader, "dali": loader} over the val split of `folder`, micro-batch 3, one rank."""
    return {
        backend: build_val_loader(
            DataConfig(shards=[str(folder)], backend=backend, num_workers=int(backend == "dali")),
            image_size=image_size,
            micro_batch=3,
            rank=0,
            world_size=1,
        )  # fmt: skip
        for backend in ("wds", "dali")
    }


def assert_same_rows(
    wds: list[dict], dali: list[dict], std: float, border_tolerance: float = BORDER_TOLERANCE
) -> None:
    """Same keys, positions, weights, labels, roi; pixels equal within tolerances (fractions of full scale)."""
    assert len(wds) == len(dali)
    for w, d in zip(wds, dali):
        assert w["key"] == d["key"]
        assert torch.equal(w["position"], d["position"]) and torch.equal(w["weight"], d["weight"])
        assert torch.equal(w["labels"].isnan(), d["labels"].isnan())
        assert torch.equal(w["labels"].nan_to_num(), d["labels"].nan_to_num())
        assert torch.equal(w["roi"], d["roi"])
        assert d["image"].shape == w["image"].shape and d["image"].dtype == torch.float32
        diff = (w["image"] - d["image"]).abs() * std  # back to fractions of full scale
        assert diff[..., 1:-1, 1:-1].max() < 1e-5  # interior: the same antialiased bilinear filter
        assert diff.max() < border_tolerance  # outermost rows/cols: edge handling differs slightly
        assert diff.mean() < 0.1 * GREY_LEVEL


@pytest.mark.parametrize("image_format", ["png16", "jpg", "jp2"])
def test_dali_cpu_decodes_same_pixels_as_wds(tmp_path, image_format):
    """Same rows from both backends, a corrupt member (its image header damaged) included: the same
    padding row in its place and the same skip record."""
    fixture = write_shard_folder(
        tmp_path, image_format=image_format, size_hw=(48, 40), splits={"train": 2, "val": 6}
    )
    bad_key = sorted(fixture.keys("val"))[4]
    damage_member(tmp_path, bad_key, EXTENSION[image_format], where="start")
    std = ShardFolder(tmp_path).intensity_std
    loaders = val_loaders_of_both_backends(tmp_path, image_size=(20, 17))
    wds, dali = (list(loaders[backend]) for backend in ("wds", "dali"))
    assert [len(b["key"]) for b in dali] == [3, 3]
    assert [b["weight"].tolist() for b in dali] == [[1.0, 1.0, 1.0], [1.0, 0.0, 1.0]]
    assert_same_rows(wds, dali, std)
    named = {b: [(r["position"], r["shard"], r["key"]) for r in loaders[b].skipped] for b in loaders}
    assert named["wds"] == named["dali"] == [(4, "phantom-val-000000.tar", bad_key)]  # reasons word it apart


def test_damaged_jpeg_scan_data_is_skipped_by_both_backends_alike(tmp_path):
    """A stray marker inside a JPEG's scan data: Pillow refuses it, DALI's libjpeg decodes it into
    noise without an error, so the decoders alone disagree on what is corrupt (and plain flipped bits
    there pass both). The crc32 the converter records in each json settles it before any decoder:
    both backends skip that sample with the same record and give the same rows."""
    import io

    from nvidia.dali import fn, pipeline_def, types
    from PIL import Image

    from xray_core.shardio import read_idx, read_sample

    fixture = write_shard_folder(
        tmp_path, image_format="jpg", size_hw=(96, 80), splits={"val": 6}, checksums=True
    )
    bad_key = sorted(fixture.keys("val"))[2]
    shard = damage_member(tmp_path, bad_key, "jpg", where="middle", pattern=b"\x00\xff\x12\x34")
    with open(tmp_path / shard, "rb") as f:
        sample = next(s for s in read_idx((tmp_path / shard).with_suffix(".idx")) if s.key == bad_key)
        damaged = read_sample(f, sample)["jpg"]
    with pytest.raises(OSError):  # the premise: Pillow refuses the damaged scan data ...
        Image.open(io.BytesIO(damaged)).load()

    @pipeline_def(batch_size=1, num_threads=1, device_id=None)
    def decode_only():
        encoded = fn.external_source(source=lambda: [np.frombuffer(damaged, np.uint8)], batch=True)
        return fn.decoders.image(encoded, device="cpu", output_type=types.GRAY, dtype=types.UINT16)

    pipe = decode_only()
    pipe.build()
    pipe.run()  # ... and DALI's decoder accepts it

    std = ShardFolder(tmp_path).intensity_std
    loaders = val_loaders_of_both_backends(tmp_path, image_size=(24, 20))
    wds, dali = (list(loaders[backend]) for backend in ("wds", "dali"))
    assert [b["weight"].tolist() for b in dali] == [[1.0, 1.0, 0.0], [1.0, 1.0, 1.0]]
    assert_same_rows(wds, dali, std)
    records = {
        b: [(r["position"], r["shard"], r["key"], r["reason"]) for r in loaders[b].skipped] for b in loaders
    }
    (record,) = records["wds"]
    assert records["dali"] == records["wds"] and record[:3] == (2, shard, bad_key)
    assert "jpg changed since conversion" in record[3]


def test_dali_applies_the_same_augmentation_as_wds(tmp_path):
    write_shard_folder(tmp_path, image_format="png16", size_hw=(48, 40), splits={"train": 6})
    std = ShardFolder(tmp_path).intensity_std
    augment = dict(crop_scale=[0.3, 1.0], hflip=True, brightness=0.3, contrast=0.3)
    batches = {}
    for backend in ("wds", "dali"):
        cfg = DataConfig(shards=[str(tmp_path)], backend=backend, num_workers=0, **augment)
        loader = build_train_loader(
            cfg, image_size=(16, 16), micro_batch=4, accum_steps=1, rank=0, world_size=1, seed=9
        )
        batches[backend] = list(itertools.islice(iter(loader), 3))
    # brightness can scale a border difference by up to 1.3
    assert_same_rows(batches["wds"], batches["dali"], std, 1.3 * BORDER_TOLERANCE)


@pytest.mark.parametrize("image_format, tolerance", [("png16", 1e-6), ("jp2", 1e-6), ("jpg", 3 / 255)])
def test_dali_round_trip_keeps_16_bits(tmp_path, image_format, tolerance):
    """At the stored size, DALI's image * std + mean is the source / full scale: no 8-bit detour."""
    fixture = write_shard_folder(tmp_path, image_format=image_format, size_hw=(24, 20), splits={"val": 3})
    folder = ShardFolder(tmp_path)
    full_scale = 255.0 if image_format == "jpg" else 65535.0
    cfg = DataConfig(shards=[str(tmp_path)], backend="dali", num_workers=1)
    rows = [(k, im) for b in val_batches(cfg, (24, 20)) for k, im in zip(b["key"], b["image"])]
    assert len(rows) == 3
    for key, image in rows:
        restored = image[0].numpy().astype(np.float64) * folder.intensity_std + folder.intensity_mean
        np.testing.assert_allclose(restored, fixture.samples[key].image / full_scale, atol=tolerance, rtol=0)
    if image_format != "jpg":  # 16-bit sources have values 8 bits cannot express
        assert any(np.any(s.image % 257) for s in fixture.samples.values())


def test_auto_backend_picks_wds_on_cpu_and_dali_for_gpus(tmp_path, caplog):
    write_shard_folder(tmp_path, splits={"train": 4})
    cfg = DataConfig(shards=[str(tmp_path)], backend="auto", num_workers=0)
    with caplog.at_level(logging.INFO, logger="xray_pretrain.data.loader"):
        loader = build_train_loader(
            cfg, image_size=(8, 8), micro_batch=2, accum_steps=1, rank=0, world_size=1, seed=0
        )
    # On CPU-only machines wds measured faster than DALI's CPU pipeline (benchmarks/RESULTS.md).
    assert loader.backend == "wds" and loader.decode_device == "cpu"
    assert "backend wds, decode on cpu" in caplog.text
    assert resolve_backend("auto", "cuda") == "dali"
    assert resolve_backend("dali", "cpu") == "dali"


def test_dali_val_restarts_on_every_iteration(tmp_path):
    """A partly consumed pass (the trainer's preview takes one batch) must not shift the next one."""
    write_shard_folder(tmp_path, splits={"val": 7})
    cfg = DataConfig(shards=[str(tmp_path)], backend="dali", num_workers=1)
    loader = build_val_loader(cfg, image_size=(8, 8), micro_batch=2, rank=1, world_size=2)
    first = next(iter(loader))
    full = [b["key"] for b in loader]
    assert next(iter(loader))["key"] == first["key"] == full[0]
    assert full == [b["key"] for b in loader] and len(full) == len(loader) == 2
    assert [b["weight"].tolist() for b in loader] == [[1.0, 1.0], [1.0, 0.0]]


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error on a machine without CUDA")
def test_dali_on_cuda_without_gpu_is_a_clear_error(tmp_path):
    write_shard_folder(tmp_path, splits={"train": 2})
    cfg = DataConfig(shards=[str(tmp_path)], backend="dali", num_workers=0)
    with pytest.raises(ValueError, match="CUDA is not available"):
        build_train_loader(
            cfg, image_size=(8, 8), micro_batch=2, accum_steps=1, rank=0, world_size=1, seed=0, device="cuda"
        )
