"""The wds (CPU) loader on shards written by the test: pixels, alignment, ranks, mixing, resume."""

from __future__ import annotations

import itertools
import json
from collections import Counter

import numpy as np
import pytest
import torch
from data_fixtures import bright_square_image, edge_band, needs_dali, square_roi, write_shard_folder

from xray_pretrain.data.augment import AugmentParams, TrainAugment, transform_sample
from xray_pretrain.data.config import DataConfig
from xray_pretrain.data.loader import build_train_loader, build_val_loader
from xray_pretrain.data.shards import ShardFolder

AUG_OFF = dict(crop_scale=[1.0, 1.0], crop_ratio=[1.0, 1.0])
# Behaviour both backends must share runs on each; DALI-only checks live in test_dali.py.
BACKENDS = ["wds", pytest.param("dali", marks=needs_dali)]


def train_batches(
    cfg, num_batches, *, image_size=(16, 16), micro=2, accum=1, rank=0, world=1, seed=0, start=0
):
    loader = build_train_loader(
        cfg, image_size=image_size, micro_batch=micro, accum_steps=accum, rank=rank, world_size=world,
        seed=seed, start_position=start,
    )  # fmt: skip
    return list(itertools.islice(iter(loader), num_batches))


def unnormalize(image_1HW: torch.Tensor, folder: ShardFolder) -> np.ndarray:
    return (image_1HW[0].numpy().astype(np.float64) * folder.intensity_std) + folder.intensity_mean


@pytest.mark.parametrize("image_format, tolerance", [("png16", 1e-6), ("jp2", 1e-6), ("jpg", 3 / 255)])
def test_round_trip_pixels_equal_source(tmp_path, image_format, tolerance):
    """Stored size = image_size, no augmentation: decoded, normalized, un-normalized == source / full scale."""
    fixture = write_shard_folder(
        tmp_path, image_format=image_format, size_hw=(24, 20), splits={"train": 2, "val": 3}
    )
    full_scale = 255.0 if image_format == "jpg" else 65535.0
    cfg = DataConfig(shards=[str(tmp_path)], backend="wds", num_workers=0)
    loader = build_val_loader(cfg, image_size=(24, 20), micro_batch=2, rank=0, world_size=1)
    folder = ShardFolder(tmp_path)
    rows = [(key, image, roi) for b in loader for key, image, roi in zip(b["key"], b["image"], b["roi"])]
    assert [key for key, _, _ in rows] == sorted(fixture.keys("val"))
    for key, image, roi in rows:
        source = fixture.samples[key]
        np.testing.assert_allclose(
            unnormalize(image, folder), source.image / full_scale, atol=tolerance, rtol=0
        )
        # the stored roi (long side min(128, 24) = 24, same size as the image) comes back 0/1
        assert torch.equal(roi[0], torch.from_numpy((source.roi > 0).astype(np.uint8)))


@pytest.mark.parametrize("backend", BACKENDS)
def test_missing_roi_is_estimated_from_the_image(tmp_path, backend):
    from xray_core.roi import estimate_chest_region

    fixture = write_shard_folder(tmp_path, with_roi=False, size_hw=(48, 40), splits={"val": 3})
    cfg = DataConfig(shards=[str(tmp_path)], backend=backend, num_workers=0)
    batches = list(build_val_loader(cfg, image_size=(48, 40), micro_batch=3, rank=0, world_size=1))
    for key, roi in zip(batches[0]["key"], batches[0]["roi"]):
        expected = (
            estimate_chest_region(fixture.samples[key].image)[0] >= 128
        )  # long side 48 <= 128: same size
        assert torch.equal(roi[0], torch.from_numpy(expected.astype(np.uint8)))
        assert 0 < int(roi.sum()) < roi.numel()  # a region, not all or nothing


def test_batch_contract_and_label_alignment(tmp_path):
    write_shard_folder(tmp_path / "a", label_names=("cardiomegaly", "effusion"))
    b = write_shard_folder(
        tmp_path / "b", dataset="other", label_names=("effusion", "nodule"), image_format="jpg"
    )
    cfg = DataConfig(shards=[str(tmp_path / "a"), str(tmp_path / "b")], backend="wds", num_workers=0)
    loader = build_train_loader(
        cfg, image_size=(16, 12), micro_batch=3, accum_steps=1, rank=0, world_size=1, seed=0
    )
    assert loader.label_names == ["cardiomegaly", "effusion", "nodule"]
    assert loader.num_samples_per_epoch == 12 and loader.backend == "wds" and loader.decode_device == "cpu"
    batches = list(itertools.islice(iter(loader), 4))
    batch = batches[0]
    assert batch["image"].shape == (3, 1, 16, 12) and batch["image"].dtype == torch.float32
    assert batch["roi"].shape == (3, 1, 16, 12) and batch["roi"].dtype == torch.uint8
    assert set(batch["roi"].unique().tolist()) <= {0, 1}
    assert batch["labels"].shape == (3, 3) and batch["labels"].dtype == torch.float32
    assert batch["position"].tolist() == [0, 1, 2] and batch["position"].dtype == torch.int64
    assert batch["weight"].tolist() == [1.0, 1.0, 1.0]
    rows = [(k, lab) for bt in batches for k, lab in zip(bt["key"], bt["labels"])]
    for key, labels in rows:
        if key in b.samples:  # folder b: no cardiomegaly column, its two labels scattered to 1 and 2
            assert torch.isnan(labels[0])
            np.testing.assert_array_equal(labels[1:].numpy(), b.samples[key].labels)


@pytest.mark.parametrize("backend", BACKENDS)
def test_roi_stays_aligned_with_image_after_crops(tmp_path, backend):
    write_shard_folder(
        tmp_path, size_hw=(64, 80), image_fn=bright_square_image, roi_fn=square_roi, splits={"train": 4}
    )
    cfg = DataConfig(
        shards=[str(tmp_path)], backend=backend, num_workers=0, crop_scale=[0.2, 1.0], hflip=True
    )
    batches = train_batches(cfg, 12, image_size=(24, 24), micro=4)
    folder = ShardFolder(tmp_path)
    num_checked = 0
    for batch in batches:
        for image, roi in zip(batch["image"], batch["roi"]):
            bright = unnormalize(image, folder) > 0.5
            roi_np = roi[0].numpy().astype(bool)
            # away from the roi's edge (1 output pixel), roi == 1 exactly where the image is bright
            eroded_in = roi_np & ~edge_band(roi_np)
            eroded_out = ~roi_np & ~edge_band(roi_np)
            assert bright[eroded_in].all() and not bright[eroded_out].any()
            num_checked += int(eroded_in.sum() > 0)
    assert num_checked > 10  # most crops contain part of the square


@pytest.mark.parametrize("backend", BACKENDS)
def test_two_ranks_disjoint_and_cover_the_epoch(tmp_path, backend):
    fixture = write_shard_folder(tmp_path, splits={"train": 12}, samples_per_shard=5)
    cfg = DataConfig(shards=[str(tmp_path)], backend=backend, num_workers=0, **AUG_OFF)
    keys = [[k for b in train_batches(cfg, 3, rank=r, world=2) for k in b["key"]] for r in range(2)]
    assert not set(keys[0]) & set(keys[1])
    assert sorted(keys[0] + keys[1]) == sorted(fixture.keys("train"))


@pytest.mark.parametrize("backend", BACKENDS)
def test_uneven_shards_same_batches_per_rank(tmp_path, backend):
    """One shard of 5 samples, 4 ranks x 2 workers: every rank gets batches, the first 5 positions
    are the epoch, and validation pads with weight-0 rows to the same count."""
    fixture = write_shard_folder(tmp_path, splits={"train": 5, "val": 5}, samples_per_shard=5)
    cfg = DataConfig(shards=[str(tmp_path)], backend=backend, num_workers=2, **AUG_OFF)
    per_rank = [train_batches(cfg, 3, micro=1, rank=r, world=4) for r in range(4)]
    assert [len(b) for b in per_rank] == [3, 3, 3, 3]
    by_position = {int(b["position"][0]): b["key"][0] for batches in per_rank for b in batches}
    assert sorted(by_position) == list(range(12))
    assert sorted(by_position[p] for p in range(5)) == sorted(fixture.keys("train"))
    val = [
        list(build_val_loader(cfg, image_size=(16, 16), micro_batch=1, rank=r, world_size=4))
        for r in range(4)
    ]
    assert [len(v) for v in val] == [2, 2, 2, 2]
    weights = [float(b["weight"][0]) for v in val for b in v]
    assert sorted(weights) == [0.0] * 3 + [1.0] * 5
    real_keys = [b["key"][0] for v in val for b in v if float(b["weight"][0]) == 1.0]
    assert sorted(real_keys) == sorted(fixture.keys("val"))


@pytest.mark.parametrize("backend", BACKENDS)
def test_weighted_mixing_gives_exact_epoch_counts(tmp_path, backend):
    a = write_shard_folder(tmp_path / "a", splits={"train": 6})
    b = write_shard_folder(tmp_path / "b", dataset="other", splits={"train": 2})
    cfg = DataConfig(
        shards=[str(tmp_path / "a"), str(tmp_path / "b")], weights=[1, 3], backend=backend, num_workers=0
    )
    for epoch in range(2):
        batches = train_batches(cfg, 2, micro=4, start=epoch * 8)  # one epoch = 8 samples
        keys = [k for batch in batches for k in batch["key"]]
        from_b = Counter(k for k in keys if k in b.samples)
        assert sum(1 for k in keys if k in a.samples) == 2
        assert from_b == dict.fromkeys(b.keys("train"), 3)


AUG_ON = dict(crop_scale=[0.4, 1.0], brightness=0.2, contrast=0.2, hflip=True)


def assert_same_batches(left: list[dict], right: list[dict]) -> None:
    assert len(left) == len(right)
    for x, y in zip(left, right):
        assert x["key"] == y["key"] and torch.equal(x["position"], y["position"])
        assert torch.equal(x["image"], y["image"]) and torch.equal(x["roi"], y["roi"])


@pytest.mark.parametrize("backend", BACKENDS)
def test_resume_gives_identical_batches(tmp_path, backend):
    write_shard_folder(tmp_path, splits={"train": 7}, samples_per_shard=3)
    straight = train_batches(
        DataConfig(shards=[str(tmp_path)], backend=backend, num_workers=0, **AUG_ON), 6, micro=2, accum=2
    )
    resumed_cfg = DataConfig(shards=[str(tmp_path)], backend=backend, num_workers=2, **AUG_ON)
    # stop after 2 optimizer steps (4 micro-batches of 2, G = 4), rebuild at samples_seen = 8
    resumed = train_batches(resumed_cfg, 2, micro=2, accum=2, start=8)
    assert_same_batches(straight[4:], resumed)


@pytest.mark.parametrize("backend", BACKENDS)
def test_resume_after_world_size_change_same_samples_per_step(tmp_path, backend):
    write_shard_folder(tmp_path, splits={"train": 7}, samples_per_shard=3)
    cfg = DataConfig(shards=[str(tmp_path)], backend=backend, num_workers=0, **AUG_ON)
    # world 2, accum 1, micro 2 -> G = 4; 3 steps. Then world 1, accum 2, micro 2 from step 1.
    world2 = [train_batches(cfg, 3, micro=2, accum=1, rank=r, world=2) for r in range(2)]
    world1 = train_batches(cfg, 4, micro=2, accum=2, rank=0, world=1, start=4)
    for step in (1, 2):
        before = {int(p): (k, img) for r in range(2) for k, p, img in rows(world2[r][step])}
        after = {int(p): (k, img) for a in range(2) for k, p, img in rows(world1[(step - 1) * 2 + a])}
        assert sorted(before) == sorted(after) == list(range(step * 4, step * 4 + 4))
        for position, (key, image) in before.items():
            assert after[position][0] == key and torch.equal(after[position][1], image)


def rows(batch: dict):
    return zip(batch["key"], batch["position"], batch["image"])


def test_augmentation_depends_only_on_seed_and_position():
    augment = TrainAugment(crop_scale=(0.3, 1.0), hflip=True, brightness=0.3, contrast=0.3)
    assert augment.sample(5, 17) == augment.sample(5, 17)
    samples = [augment.sample(5, p) for p in range(200)]
    assert len({s.crop_width for s in samples}) == 200
    assert 60 < sum(s.flip for s in samples) < 140
    for s in samples:
        area = s.crop_width * s.crop_height
        assert (
            0.3 - 1e-9 <= area <= 1.0 and s.crop_top + s.crop_height <= 1 and s.crop_left + s.crop_width <= 1
        )
        assert 0.75 - 1e-9 <= s.crop_width / s.crop_height <= 4 / 3 + 1e-9
        assert 0.7 <= s.brightness <= 1.3 and 0.7 <= s.contrast <= 1.3


def test_intensity_jitter_and_flip_formula():
    image = np.linspace(0, 1, 6 * 8, dtype=np.float32).reshape(6, 8)
    roi = (np.arange(8)[None, :] < 3).repeat(6, 0).astype(np.uint8)
    plain, plain_roi = transform_sample(image, roi, AugmentParams(), (6, 8), mean=0.25, std=0.5)
    np.testing.assert_allclose(plain[0].numpy(), (image - 0.25) / 0.5, atol=1e-6)
    params = AugmentParams(flip=True, brightness=1.2, contrast=0.8)
    jittered, jittered_roi = transform_sample(image, roi, params, (6, 8), mean=0.25, std=0.5)
    expected = (1.2 * (0.5 + 0.8 * (image - 0.5)) - 0.25) / 0.5
    np.testing.assert_allclose(jittered[0].numpy(), expected[:, ::-1], atol=1e-6)
    assert torch.equal(jittered_roi, plain_roi.flip(-1))


def test_val_loader_is_sorted_and_reiterable(tmp_path):
    fixture = write_shard_folder(tmp_path, splits={"train": 2, "val": 7})
    cfg = DataConfig(shards=[str(tmp_path)], backend="wds", num_workers=1, val_num_samples=5)
    loaders = [
        build_val_loader(cfg, image_size=(8, 8), micro_batch=2, rank=r, world_size=2) for r in range(2)
    ]
    first = [[k for b in loader for k in b["key"]] for loader in loaders]
    second = [[k for b in loader for k in b["key"]] for loader in loaders]
    assert first == second
    expected = sorted(fixture.keys("val"))[:5]
    assert first[0] == [expected[0], expected[2], expected[4]] and first[1] == [
        expected[1],
        expected[3],
        expected[0],
    ]
    assert [len(loader) for loader in loaders] == [2, 2] and loaders[0].num_samples == 5


def test_folder_errors_name_the_fix(tmp_path):
    write_shard_folder(tmp_path / "ok")
    with pytest.raises(ValueError, match="no manifest.json"):
        ShardFolder(tmp_path)
    next((tmp_path / "ok").glob("*-train-000001.idx")).unlink()
    with pytest.raises(ValueError, match="xray-shard index"):
        ShardFolder(tmp_path / "ok")
    write_shard_folder(tmp_path / "v")
    manifest = json.loads((tmp_path / "v" / "manifest.json").read_text())
    (tmp_path / "v" / "manifest.json").write_text(json.dumps({**manifest, "format_version": 2}))
    with pytest.raises(ValueError, match="format_version 2"):
        ShardFolder(tmp_path / "v")


def test_bad_idx_offsets_are_caught(tmp_path):
    write_shard_folder(tmp_path, splits={"train": 2})
    idx = next(tmp_path.glob("*-train-000000.idx"))
    lines = idx.read_text().splitlines()
    fields = lines[1].split()
    fields[1] = "0"  # the image's data offset
    idx.write_text("\n".join([lines[0], " ".join(fields), *lines[2:]]) + "\n")
    with pytest.raises(ValueError, match="rebuild the index"):
        ShardFolder(tmp_path).split_samples("train")


@pytest.mark.parametrize(
    "overrides, match",
    [
        (dict(shards=[]), r"set data.shards=\[DIR"),
        (dict(weights=[1.0]), "2 data.shards folders"),
        (dict(backend="tfrecord"), "choose one of auto, dali, wds"),
        (dict(crop_scale=[0.5, 1.5]), "data.crop_scale"),
        (dict(brightness=1.0), "data.brightness"),
        (dict(num_workers=-1), "data.num_workers"),
    ],
)
def test_config_validation_messages(overrides, match):
    cfg = DataConfig(**{"shards": ["a", "b"], **overrides})
    with pytest.raises(ValueError, match=match):
        cfg.validate()


def test_train_log_gives_the_share_on_each_chest_region_path(phantom_shards, tmp_path, caplog):
    cfg = DataConfig(shards=[str(phantom_shards)], backend="wds", num_workers=0)
    with caplog.at_level("INFO", logger="xray_pretrain.data.loader"):
        build_train_loader(
            cfg, image_size=(64, 64), micro_batch=2, accum_steps=1, rank=0, world_size=1, seed=0
        )
    line = next(r.getMessage() for r in caplog.records if "train chest region" in r.getMessage())
    assert "fitted " in line and line.endswith("%")
    write_shard_folder(tmp_path / "old", splits={"train": 3})  # a manifest without per-shard counts
    with caplog.at_level("INFO", logger="xray_pretrain.data.loader"):
        cfg = DataConfig(shards=[str(tmp_path / "old")], backend="wds", num_workers=0)
        build_train_loader(
            cfg, image_size=(16, 16), micro_batch=1, accum_steps=1, rank=0, world_size=1, seed=0
        )
    assert "not recorded (old shards) 100.0%" in caplog.records[-1].getMessage()
