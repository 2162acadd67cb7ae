"""`xray-shard refresh-roi`: shards made with an older chest-region estimate get the current one in
place, everything else byte-identical, and the folder still verifies."""

from __future__ import annotations

import io
import json
import shutil
from collections import Counter

import numpy as np
from PIL import Image

from data_tools import refresh_roi as refresh_module
from data_tools.cli import main as xray_shard
from data_tools.manifest import read_manifest
from data_tools.stats import folder_stats
from data_tools.verify import verify
from xray_core.roi import estimate_chest_region_detail, small_copy
from xray_core.shardio import idx_path_for, read_idx, read_sample


def _samples(folder):
    found = {}
    for tar in sorted(folder.glob("*.tar")):
        with open(tar, "rb") as f:
            for sample in read_idx(idx_path_for(tar)):
                found[sample.key] = read_sample(f, sample)
    return found


def _as_old_estimate(components):
    """What the Otsu estimate wrote when it fell back: the whole mask set, no method or confidence."""
    meta = json.loads(components["json"])
    for key in ("roi_method", "roi_confidence"):
        meta.pop(key)
    meta["roi_box"], meta["flags"] = [0.1, 0.1, 0.9, 0.9], [*meta["flags"], "roi_fallback"]
    mask = np.full(np.asarray(Image.open(io.BytesIO(components["roi.png"]))).shape, 255, np.uint8)
    aged = dict(components, json=json.dumps(meta).encode())
    aged["roi.png"] = refresh_module.encode_png(mask)
    return aged, "old estimate"


def test_refresh_roi_replaces_old_regions_and_keeps_everything_else(
    phantom_shards, tmp_path, monkeypatch, capsys
):
    folder = tmp_path / "shards"
    shutil.copytree(phantom_shards, folder)
    with monkeypatch.context() as patch:  # make the copy look like shards of the old estimate
        patch.setattr(refresh_module, "refresh_components", _as_old_estimate)
        refresh_module.refresh_roi(folder, progress=False)
    assert folder_stats(folder)["roi_paths"] == {"old estimate": 160}
    old = _samples(folder)

    assert xray_shard(["refresh-roi", str(folder), "--workers", "2", "--no-progress"]) == 0
    assert "chest region: fitted" in capsys.readouterr().out
    assert verify(folder) == []
    new = _samples(folder)
    assert new.keys() == old.keys()
    for key, components in new.items():
        assert components["png"] == old[key]["png"] and components["labels.npy"] == old[key]["labels.npy"]
        meta, old_meta = json.loads(components["json"]), json.loads(old[key]["json"])
        image = np.asarray(Image.open(io.BytesIO(components["png"])))
        region = estimate_chest_region_detail(image, small_copy(image), view=meta["view"])
        assert (meta["roi_box"], meta["roi_method"], meta["roi_confidence"]) == (
            region.box,
            region.method,
            region.confidence,
        )
        assert np.array_equal(np.asarray(Image.open(io.BytesIO(components["roi.png"]))), region.mask_hw)
        assert "roi_fallback" not in meta["flags"]
        unchanged = {k: v for k, v in meta.items() if not k.startswith("roi_") and k != "flags"}
        assert unchanged == {k: v for k, v in old_meta.items() if not k.startswith("roi_") and k != "flags"}
    counted = folder_stats(folder)["roi_paths"]
    assert sum(counted.values()) == 160
    recorded = Counter()  # the manifest's per-shard counts (what the training log reads)
    for entry in read_manifest(folder)["shards"]:
        recorded.update(entry["roi_paths"])
    assert recorded == counted
