"""The shard format itself: tars that standard WebDataset readers and DALI's idx format agree on."""

from __future__ import annotations

import numpy as np
import pytest
from data_fixtures import write_shard_folder

from xray_core.shardio import (
    ShardTarWriter,
    idx_path_for,
    index_tar,
    read_idx,
    read_sample,
    sample_key,
)


def test_the_webdataset_library_reads_our_shards_sample_for_sample(tmp_path):
    import webdataset as wds

    folder = write_shard_folder(tmp_path, splits={"train": 6}, samples_per_shard=6)
    tar = next(tmp_path.glob("*-train-000000.tar"))
    ours = read_idx(idx_path_for(tar))
    theirs = list(wds.WebDataset(str(tar), shardshuffle=False))
    assert [s["__key__"] for s in theirs] == [s.key for s in ours]
    assert sorted(s.key for s in ours) == sorted(folder.keys("train"))
    with open(tar, "rb") as f:
        for entry, sample in zip(ours, theirs):
            components = read_sample(f, entry)
            assert set(components) == {"png", "roi.png", "labels.npy", "json"}
            for ext, data in components.items():
                assert sample[ext] == data  # the same bytes through the idx offsets and the tar stream


def test_idx_matches_a_scan_of_the_tar_and_writes_are_atomic(tmp_path):
    tar = tmp_path / "x-train-000000.tar"
    writer = ShardTarWriter(tar)
    for i in range(3):
        writer.write_sample(sample_key("x", f"img{i}"), {"png": bytes(range(i * 50)), "json": b"{}"})
    assert not tar.exists() and not idx_path_for(tar).exists()  # nothing under the final name yet
    writer.close()
    assert read_idx(idx_path_for(tar)) == index_tar(tar)
    assert not list(tmp_path.glob("*.partial"))


def test_unknown_components_and_malformed_idx_are_refused(tmp_path):
    writer = ShardTarWriter(tmp_path / "x-train-000000.tar")
    with pytest.raises(ValueError, match="unknown sample components"):
        writer.write_sample("k", {"dcm": b""})
    writer.abort()
    bad = tmp_path / "bad.idx"
    bad.write_text("v1.2 2\npng 512 10 k.png\n")
    with pytest.raises(ValueError, match="header says 2 samples, found 1"):
        read_idx(bad)
    bad.write_text("v1.1 1\npng 512 10 k.png\n")
    with pytest.raises(ValueError, match="is not 'v1.2"):
        read_idx(bad)


def test_sample_keys_are_stable_and_distinct():
    keys = {sample_key("nih", f"images/{i:08d}.png") for i in range(1000)}
    assert len(keys) == 1000
    assert sample_key("nih", "a.png") == sample_key("nih", "a.png") != sample_key("chexpert", "a.png")
    assert all(len(k) == 16 and int(k, 16) >= 0 for k in list(keys)[:10])
    assert np.unique([k[:4] for k in keys]).size > 500  # hashed, not sequential


def test_the_writer_hashes_the_tar_it_wrote(tmp_path):
    import hashlib

    writer = ShardTarWriter(tmp_path / "x-train-000000.tar")
    writer.write_sample("k", {"png": b"\x89PNG" * 1000, "json": b"{}"})
    writer.close()
    data = (tmp_path / "x-train-000000.tar").read_bytes()
    assert writer.num_bytes == len(data) and writer.sha256 == hashlib.sha256(data).hexdigest()
