"""The data path stays compact at scale: a 100k-sample folder (hard-linked real shards) costs a few
bytes per sample, no Python object per sample, a rank's order work that does not grow with the epoch,
and reads that open each tar once.

Timings live in benchmarks/data_scale.py; here only sizes and counts, which do not flake under load.
"""

from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
import tracemalloc
from pathlib import Path

import numpy as np
import pytest
from data_fixtures import link_scaled_folder, write_shard_folder

from xray_core.shardindex import INDEX_NAME, index_folder, read_index
from xray_pretrain.data.order import BLOCK_POSITIONS, GlobalOrder, RankShare, micro_batch_positions
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
    num_train, num_val = table.folder_sizes[0], NUM_LINKS["val"] * REAL_SHARD
    assert num_train == NUM_LINKS["train"] * REAL_SHARD and len(val) == 64
    # Before the compact index: ~1.1 KB and 2 GC-tracked objects per sample. Now the records are
    # mapped (not Python heap); what stays is one block of this rank's located positions (16 bytes
    # each) and per-shard facts (manifest entries, index header, tar paths).
    num_shards = sum(NUM_LINKS.values())
    assert num_new_objects < 2000 + 10 * num_shards, num_new_objects
    assert len(share._folders) == BLOCK_POSITIONS  # one block of its own positions, not its epoch share
    assert retained < 16 * BLOCK_POSITIONS + 2048 * num_shards, retained
    # Transient: the block's keys and cycle walk, and the val split's key prefixes (~40 bytes per val
    # sample). Shuffling the epoch, as before, peaked at 8 bytes per train sample on top.
    assert peak < 48 * num_val + 256 * BLOCK_POSITIONS + 2048 * num_shards, peak


def _rank_rows(num_samples: int, rank: int, micro_steps: range) -> list[tuple[int, int]]:
    """(folder, index) of `rank`'s positions at `micro_steps` (world WORLD, micro-batch 4)."""
    share = RankShare(
        GlobalOrder([num_samples, 3], [1, 1], seed=5), rank=rank, world_size=WORLD, micro_batch=4
    )
    return [share.locate(p) for m in micro_steps for p in micro_batch_positions(m, rank, 4, WORLD)]


def test_a_rank_computes_only_its_positions_at_any_epoch_size():
    """The order is a seeded bijection evaluated per position: a rank's first batch costs the same
    memory at 10^6 and at 10^10 samples per epoch (a shuffled array of the latter would take 80 GB),
    and a rank needs no other rank's work."""
    peaks = []
    for num_samples in (10**6, 10**10):
        tracemalloc.start()
        rows = _rank_rows(num_samples, rank=5, micro_steps=range(2))
        peaks.append(tracemalloc.get_traced_memory()[1])
        tracemalloc.stop()
        order = GlobalOrder([num_samples, 3], [1, 1], seed=5)
        assert rows == [order.locate(p) for m in range(2) for p in micro_batch_positions(m, 5, 4, WORLD)]
    assert max(peaks) < 256 * BLOCK_POSITIONS, peaks  # ~180 bytes per located position, transient
    assert peaks[1] < 1.25 * peaks[0], peaks  # nothing grows with the epoch


def test_every_process_computes_the_same_order():
    """Two fresh interpreters (different hash seeds), each locating only its own rank's positions
    from (seed, sizes, weights), agree with this process and with the whole epoch's order."""
    num_samples, steps = 50_000, range(0, 1300, 7)  # crosses blocks of BLOCK_POSITIONS positions
    code = (
        "import json, sys; sys.path.insert(0, sys.argv[1]); "
        "from xray_pretrain.data.order import GlobalOrder, RankShare, micro_batch_positions; "
        "rank = int(sys.argv[2]); "
        f"share = RankShare(GlobalOrder([{num_samples}, 3], [1, 1], seed=5), rank=rank, world_size={WORLD}, "
        "micro_batch=4); "
        f"steps = range({steps.start}, {steps.stop}, {steps.step}); "
        f"print(json.dumps([share.locate(p) for m in steps for p in micro_batch_positions(m, rank, 4, {WORLD})]))"
    )
    outputs = {}
    for rank, hash_seed in ((2, "1"), (7, "2")):
        env = {**os.environ, "PYTHONHASHSEED": hash_seed}
        repo = str(Path(__file__).resolve().parents[1])
        done = subprocess.run([sys.executable, "-c", code, repo, str(rank)], env=env,
                              capture_output=True, text=True, timeout=120, check=True)  # fmt: skip
        outputs[rank] = [tuple(row) for row in json.loads(done.stdout)]
    folders, indices = GlobalOrder([num_samples, 3], [1, 1], seed=5).epoch(0)
    for rank, rows in outputs.items():
        assert rows == _rank_rows(num_samples, rank, steps)
        positions = [p for m in steps for p in micro_batch_positions(m, rank, 4, WORLD)]
        assert rows == [(int(folders[p]), int(indices[p])) for p in positions]


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
