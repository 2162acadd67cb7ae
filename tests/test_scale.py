"""The data path stays compact at scale: a 100k-sample folder (hard-linked real shards) costs a few
bytes per sample, no Python object per sample, and reads that open each tar once.

Timings live in benchmarks/data_scale.py; here only sizes and counts, which do not flake under load.
"""

from __future__ import annotations

import gc
import tracemalloc

import numpy as np
import pytest
from data_fixtures import link_scaled_folder, write_shard_folder

from xray_core.shardindex import INDEX_NAME, index_folder, read_index
from xray_pretrain.data.order import GlobalOrder, RankShare
from xray_pretrain.data.shards import ShardFolder, ShardReader, SplitTable

REAL_SHARD = 500
NUM_LINKS = {"train": 180, "val": 20}  # 90k + 10k samples
WORLD = 8


@pytest.fixture(scope="module")
def big_folder(tmp_path_factory):
    root = tmp_path_factory.mktemp("scale")
    write_shard_folder(root / "real", splits={"train": 2 * REAL_SHARD, "val": REAL_SHARD},
                       samples_per_shard=REAL_SHARD, size_hw=(8, 8))  # fmt: skip
    link_scaled_folder(root / "real", root / "big", NUM_LINKS)
    return root / "big"


def test_index_is_at_most_64_bytes_per_sample_and_found_again(big_folder):
    path = index_folder(big_folder)
    header, records = read_index(big_folder)
    num_samples = sum(NUM_LINKS.values()) * REAL_SHARD
    assert header["num_samples"] == len(records) == num_samples
    assert records.dtype.itemsize <= 64
    header_bytes = path.stat().st_size - records.nbytes
    assert header_bytes < 250 * len(header["shards"]) + 1000  # the header grows with shards only
    assert isinstance(records, np.memmap)  # mapped, shared by every process of a node


def test_rank_tables_hold_no_per_sample_objects(big_folder):
    index_folder(big_folder)
    gc.collect()
    num_objects = len(gc.get_objects())
    tracemalloc.start()
    folder = ShardFolder(big_folder)
    table = SplitTable([folder], "train")
    share = RankShare(GlobalOrder(table.folder_sizes, None, seed=0), rank=3, world_size=WORLD, micro_batch=4)
    share.locate(3 * 4)
    val = SplitTable([folder], "val").first_by_key(64)
    retained, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    gc.collect()
    num_new_objects = len(gc.get_objects()) - num_objects
    num_train = table.folder_sizes[0]
    assert num_train == NUM_LINKS["train"] * REAL_SHARD and len(val) == 64
    # Before the compact index: ~1.1 KB and 2 GC-tracked objects per sample. Now the records are
    # mapped (not Python heap); what stays is this rank's share of the epoch (6 bytes per position
    # it reads) and per-shard facts (manifest entries, index header, tar paths).
    num_shards = sum(NUM_LINKS.values())
    assert num_new_objects < 2000 + 10 * num_shards, num_new_objects
    assert retained < 6 * num_train / WORLD + 2048 * num_shards, retained
    assert peak / num_train < 40, peak / num_train  # the epoch permutation, transient
    assert abs(len(share._cache[0][0]) - num_train / WORLD) <= 4  # its share, +- one micro-batch


def test_reads_open_each_tar_once(big_folder):
    folder = ShardFolder(big_folder)
    table = SplitTable([folder], "train")
    reader = ShardReader()
    rng = np.random.default_rng(0)
    indices = rng.integers(0, table.folder_sizes[0], size=3000)
    keys = [table.read(reader, 0, int(i)).key for i in indices]
    shards_touched = {int(table.records[0][int(i)]["shard"]) for i in indices}
    assert reader.num_reads == 3000 and reader.num_opens == len(shards_touched) <= NUM_LINKS["train"]
    assert keys[0] == table.key(0, int(indices[0]))
    small = ShardReader(max_open_files=16)  # an LRU smaller than the shards: evicts, never leaks
    for i in indices[:200]:
        table.read(small, 0, int(i))
    assert len(small._fds) == 16 and small.num_opens > 16


def test_index_is_rebuilt_when_an_idx_changes(tmp_path):
    write_shard_folder(tmp_path, splits={"train": 8, "val": 4})
    header, _records = read_index(tmp_path) or (None, None)
    assert header is None  # the fixture writes no index: the first loader builds it
    assert len(ShardFolder(tmp_path).split_samples("train")) == 8
    built = (tmp_path / INDEX_NAME).stat().st_mtime_ns
    assert len(ShardFolder(tmp_path).split_samples("val")) == 4
    assert (tmp_path / INDEX_NAME).stat().st_mtime_ns == built  # current: mapped, not rebuilt
    idx = next(tmp_path.glob("*-train-000000.idx"))
    lines = idx.read_text().splitlines()
    fields = lines[1].split()
    fields[1] = "0"
    idx.write_text("\n".join([lines[0], " ".join(fields), *lines[2:]]) + "\n")
    with pytest.raises(ValueError, match="rebuild the index"):
        ShardFolder(tmp_path).split_samples("train")


def test_val_subset_matches_a_full_sort_with_ties(big_folder):
    folder = ShardFolder(big_folder)
    table = SplitTable([folder, folder], "val")  # every key twice per folder link, and in both folders
    keys = folder.split_samples("val")["key"]
    expected = sorted((k, f, i) for f in range(2) for i, k in enumerate(keys.tolist()))[:101]
    assert table.first_by_key(101).tolist() == [[f, i] for _k, f, i in expected]
    assert len(table.first_by_key(10**9)) == 2 * len(keys)
