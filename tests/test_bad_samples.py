"""Corrupt data inside shards (issue 11, item 3): every kind injected for real into a copy of the
phantom shards; each backend skips, names, counts and replaces by position; verify names each one;
above data.max_bad_fraction the run stops naming shard and key; a resumed run equals a straight one.
"""

from __future__ import annotations

import io
import itertools
import json
import shutil
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY_CONFIG, base_overrides
from data_fixtures import damage_member, needs_dali

from data_tools.cli import main as shard_main
from data_tools.verify import verify
from xray_core.shardio import ShardTarWriter, read_idx, read_sample
from xray_pretrain.data.config import DataConfig
from xray_pretrain.data.loader import build_train_loader
from xray_pretrain.data.order import GlobalOrder
from xray_pretrain.data.shards import SplitTable, open_folders

MICRO = 8
EPOCH_BATCHES = 16  # 128 positions of the 129-sample train split
# sample index in the train tar -> the corruption injected there, and what the skip must say
CORRUPTIONS = {
    3: ("image bytes flipped inside the PNG data", "png changed since conversion (crc32"),
    10: ("no json member", "json"),
    20: ("json bytes that do not parse", "json"),
    30: ("labels.npy of 3 values for 5 labels", "labels.npy has 3 values"),
    40: ("idx offset of the image moved one block on", "idx disagrees with the tar"),
    128: ("tar cut inside the last sample's image", "short read"),
}


def corrupt_copy(phantom_shards: Path, out: Path) -> tuple[Path, dict[str, int]]:
    """A copy of the phantom shards with every corruption of CORRUPTIONS in its train tar and the
    image of the first validation sample (`first_val_key`) damaged; returns (folder, {corrupt train
    key: sample index})."""
    shutil.copytree(phantom_shards, out)
    tar = out / "csv-train-000000.tar"
    with open(tar, "rb") as f:
        samples = [(s.key, read_sample(f, s)) for s in read_idx(tar.with_suffix(".idx"))]
    assert len(samples) == 129
    for i, (key, comps) in enumerate(samples):
        if i == 3:
            png = bytearray(comps["png"])
            png[len(png) // 2 : len(png) // 2 + 4] = bytes(
                b ^ 0xFF for b in png[len(png) // 2 : len(png) // 2 + 4]
            )
            comps["png"] = bytes(png)
        elif i == 10:
            del comps["json"]
        elif i == 20:
            comps["json"] = b'{"key": "' + key.encode() + b'", "labels": {'
        elif i == 30:
            buffer = io.BytesIO()
            np.save(buffer, np.zeros(3, np.float32))
            comps["labels.npy"] = buffer.getvalue()
    writer = ShardTarWriter(tar)  # the tar rewritten as a writer would have, then damaged in place
    for key, comps in samples:
        writer.write_sample(key, comps)
    writer.close()
    idx = tar.with_suffix(".idx")
    lines = idx.read_text().splitlines()
    fields = lines[1 + 40].split()
    fields[1] = str(int(fields[1]) + 512)  # still block-aligned, inside the tar: only the header tells
    lines[1 + 40] = " ".join(fields)
    idx.write_text("\n".join(lines) + "\n")
    last_image_offset = int(lines[1 + 128].split()[1])
    with open(tar, "r+b") as f:
        f.truncate(last_image_offset + 100)
    damage_member(out, first_val_key(out), "png")
    return out, {samples[i][0]: i for i in CORRUPTIONS}


def first_val_key(folder: Path) -> str:
    """The key of validation item 0 (sorted-key order): the sample that also pads the ranks."""
    table = SplitTable(open_folders([str(folder)]), "val")
    return table.key(*table.first_by_key(1)[0])


@pytest.fixture(scope="module")
def corrupt(phantom_shards, tmp_path_factory) -> tuple[Path, dict[str, int]]:
    return corrupt_copy(phantom_shards, tmp_path_factory.mktemp("corrupt") / "shards")


def epoch_batches(folder: Path, backend: str, start: int = 0, num: int = EPOCH_BATCHES):
    cfg = DataConfig(shards=[str(folder)], backend=backend, num_workers=1)
    loader = build_train_loader(
        cfg, image_size=(64, 64), micro_batch=MICRO, accum_steps=1, rank=0, world_size=1, seed=0,
        start_position=start,
    )  # fmt: skip
    stream = iter(loader)
    batches = list(itertools.islice(stream, num))
    return loader, batches


def expected_bad_positions(folder: Path, bad_keys: dict[str, int], num_positions: int) -> dict[int, str]:
    table = SplitTable(open_folders([str(folder)]), "train")
    order = GlobalOrder(table.folder_sizes, None, seed=0)
    located = (order.locate(p) for p in range(num_positions))
    return {p: table.key(*fi) for p, fi in enumerate(located) if table.key(*fi) in bad_keys}


@pytest.mark.parametrize("backend", ["wds", pytest.param("dali", marks=needs_dali)])
def test_each_corruption_is_skipped_named_and_replaced_by_position(corrupt, backend, caplog):
    folder, bad_keys = corrupt
    with caplog.at_level("WARNING", logger="xray_pretrain.data.badsamples"):
        loader, batches = epoch_batches(folder, backend)
    expected = expected_bad_positions(folder, bad_keys, EPOCH_BATCHES * MICRO)
    assert len(expected) >= len(CORRUPTIONS) - 1  # one sample's epoch-0 position lies past 16 batches
    assert loader.bad.num_bad == len(expected)
    assert all(len(b["key"]) == MICRO and b["image"].shape[0] == MICRO for b in batches)  # same batch size
    assert all("bad" not in b for b in batches)  # taken out of the batch by the loader
    keys = [k for b in batches for k in b["key"]]
    positions = [int(p) for b in batches for p in b["position"]]
    assert positions == list(range(EPOCH_BATCHES * MICRO))
    table = SplitTable(open_folders([str(folder)]), "train")
    order = GlobalOrder(table.folder_sizes, None, seed=0)
    for position, key in zip(positions, keys):
        if position in expected:  # replaced by an intact sample of the folder
            assert key not in bad_keys
        else:  # nothing else lost or moved
            assert key == table.key(*order.locate(position))
    logged = [r.getMessage() for r in caplog.records]
    for position, key in expected.items():
        reason = CORRUPTIONS[bad_keys[key]][1]  # the same on both backends: found before any decoder
        line = next(m for m in logged if f"csv-train-000000.tar:{key} at position {position}" in m)
        assert reason in line, line
    assert np.isfinite(torch.cat([b["image"] for b in batches]).numpy()).all()


@pytest.mark.parametrize("backend", ["wds", pytest.param("dali", marks=needs_dali)])
def test_resumed_stream_reads_the_same_replacements(corrupt, backend):
    folder, _ = corrupt
    _, straight = epoch_batches(folder, backend)
    _, resumed = epoch_batches(folder, backend, start=8 * MICRO, num=EPOCH_BATCHES - 8)
    for a, b in zip(straight[8:], resumed):
        assert a["key"] == b["key"]
        torch.testing.assert_close(a["image"], b["image"], rtol=0, atol=0)


@needs_dali
def test_both_backends_replace_with_the_same_samples(corrupt):
    folder, _ = corrupt
    _, wds = epoch_batches(folder, "wds")
    _, dali = epoch_batches(folder, "dali")
    assert [b["key"] for b in wds] == [b["key"] for b in dali]


def test_verify_names_every_corruption_by_shard_and_key(corrupt, capsys):
    folder, bad_keys = corrupt
    problems = verify(folder)
    for key in bad_keys:
        assert any(p.startswith(f"csv-train-000000.tar:{key}: ") for p in problems), (key, problems)
    assert shard_main(["verify", str(folder)]) == 1
    assert "problem(s)" in capsys.readouterr().err


def _train(folder: Path, out: Path, overrides: list[str]) -> dict:
    from xray_pretrain.config import load_config
    from xray_pretrain.engine.trainer import train

    base = [o for o in base_overrides(out, folder) if not o.startswith("data.num_workers")]
    cfg = load_config(TINY_CONFIG, [*base, "data.num_workers=0", "train.global_batch=16", "train.micro_batch=8",
                                    "log.every=1", "log.val_every=100", "log.image_every=100", *overrides])  # fmt: skip
    return train(cfg)


@pytest.mark.slow
def test_training_counts_skips_resumes_equal_and_stops_above_the_limit(corrupt, tmp_path, one_cpu_thread):
    from conftest import copy_checkpoint

    from xray_pretrain.engine.export import consolidated_state_dict

    folder, bad_keys = corrupt
    steps = ["train.steps=8", "checkpoint.every=4", "data.max_bad_fraction=0.1"]
    straight = _train(folder, tmp_path / "straight", steps)
    expected = expected_bad_positions(folder, bad_keys, 8 * 16)
    assert straight["stopped"] is None and straight["num_bad_samples"] == len(expected) >= 5
    rows = [json.loads(line) for line in (tmp_path / "straight" / "metrics.jsonl").read_text().splitlines()]
    assert [r["data/bad_samples"] for r in rows if r["step"] == 8 and "data/bad_samples" in r] == [
        len(expected)
    ]
    # The damaged validation sample: left out of the loss, named in the summary, counted in the log.
    assert straight["val_num_skipped"] == 1 and straight["val_num_samples"] == 13  # of the 14
    assert [(s["shard"], s["key"]) for s in straight["val_skipped"]] == [
        ("csv-val-000000.tar", first_val_key(folder))
    ]
    assert [r["val/num_skipped"] for r in rows if "val/num_skipped" in r] == [1]

    copy_checkpoint(tmp_path / "straight", "step00000004", tmp_path / "resumed")
    resumed = _train(folder, tmp_path / "resumed", [*steps, "checkpoint.resume=auto"])
    assert resumed["num_bad_samples"] == straight["num_bad_samples"]
    a = consolidated_state_dict(tmp_path / "straight" / "checkpoints", "step00000008")
    b = consolidated_state_dict(tmp_path / "resumed" / "checkpoints", "step00000008")
    for name in a:
        torch.testing.assert_close(b[name], a[name], rtol=0, atol=0, msg=name)

    # 0.01 of one 129-sample epoch allows 1 skip: the second one stops the run, named.
    stopped = _train(
        folder, tmp_path / "limit", ["train.steps=8", "checkpoint.every=100", "data.max_bad_fraction=0.01"]
    )
    second = sorted(expected)[1]
    assert stopped["steps"] == second // 16 + 1 and stopped["num_bad_samples"] == 2
    assert f"csv-train-000000.tar:{expected[second]}" in stopped["stopped"]
    assert "data.max_bad_fraction=0.01" in stopped["stopped"]

    # 0.05 allows the training skips of one step but not 1 of the 14 validation samples: the run stops
    # at its validation, naming the sample, instead of scoring a split that shrank.
    at_val = _train(folder, tmp_path / "val_limit", ["train.steps=1", "data.max_bad_fraction=0.05"])
    assert at_val["steps"] == 1 and "val_num_skipped" not in at_val
    assert "1 of the 14 samples of the 'val' split" in at_val["stopped"]
    assert f"csv-val-000000.tar:{first_val_key(folder)}" in at_val["stopped"]


@pytest.mark.parametrize("backend", ["wds", pytest.param("dali", marks=needs_dali)])
def test_a_report_pair_with_one_corrupt_view_is_replaced_whole(tmp_path, backend):
    """Two-view report items: a damaged lateral image replaces the whole study (frontal, lateral and
    text of another one), never a frontal paired with a stranger's lateral; in validation the whole
    study becomes a padding row."""
    from data_fixtures import write_shard_folder
    from test_report_loaders import study_meta, train_batches, val_batches

    from xray_pretrain.data.reports import ReportSpec

    fixture = write_shard_folder(
        tmp_path, splits={"train": 12, "val": 6}, size_hw=(40, 32), seed=3, meta_fn=study_meta
    )
    lateral = next(k for k in fixture.keys("train") if fixture.samples[k].meta == study_meta(4, "train"))
    damage_member(tmp_path, lateral, "png")
    frontal_of = {s.meta["study"]: k for k, s in fixture.samples.items() if s.meta["view"] == "PA"}
    loader, batches = train_batches(tmp_path, ReportSpec("findings", 2), backend, 4)
    assert loader.bad.num_bad >= 1 and loader.bad.last["key"] == lateral
    for batch in batches:
        assert batch["image"].shape[1] == 2 and frontal_of["train-s2"] not in batch["key"]
        for key, text in zip(batch["key"], batch["report"]):
            assert text == f"finding {fixture.samples[key].meta['study']}"  # the replacement's own text
    # Validation: the damaged study's row is a padding row (weight 0, no text); the others intact.
    val_lateral = next(k for k in fixture.keys("val") if fixture.samples[k].meta == study_meta(14, "val"))
    damage_member(tmp_path, val_lateral, "png")
    loader, batches = val_batches(tmp_path, ReportSpec("findings", 2), backend)
    assert [record["key"] for record in loader.skipped] == [val_lateral]
    real = {}
    for batch in batches:
        for key, text, weight in zip(batch["key"], batch["report"], batch["weight"].tolist()):
            if weight > 0:
                real[key] = text
            else:
                assert text == ""
    assert real == {frontal_of[s]: f"finding {s}" for s in ("val-s6", "val-s8")}


# ---- evaluation: a corrupt sample becomes a padding row, named and counted, left out of the metrics ----
def val_folder_pair(root: Path) -> tuple[Path, Path, list[str], dict[str, str]]:
    """(clean folder, the same folder with 2 corrupt val members, the val keys in sorted order,
    {bad key: what the skip says}).
    7 val samples in sorted-key order; item 0 (the padding sample) has image bytes that only a
    decoder finds (DALI's fails the batch), item 3 a json that does not parse (the host's check)."""
    from data_fixtures import write_shard_folder

    clean, corrupt = root / "clean", root / "corrupt"
    for folder in (clean, corrupt):
        fixture = write_shard_folder(folder, splits={"train": 2, "val": 7}, size_hw=(40, 32), seed=5)
    keys = sorted(fixture.keys("val"))
    damage_member(corrupt, keys[0], "png")
    damage_member(corrupt, keys[3], "json")
    return clean, corrupt, keys, {keys[0]: "does not decode", keys[3]: "json"}


@pytest.fixture(scope="module")
def val_folders(tmp_path_factory) -> tuple[Path, Path, list[str], dict[str, str]]:
    return val_folder_pair(tmp_path_factory.mktemp("corrupt_val"))


def val_pass(folder: Path, backend: str, rank: int = 0, world: int = 1, image_size=(32, 32)):
    from xray_pretrain.data.loader import build_val_loader

    cfg = DataConfig(shards=[str(folder)], backend=backend, num_workers=1 if backend == "dali" else 0)
    loader = build_val_loader(
        cfg, image_size=image_size, micro_batch=2, rank=rank, world_size=world, whole_split=True
    )
    return loader, list(loader)


@pytest.mark.parametrize("backend", ["wds", pytest.param("dali", marks=needs_dali)])
def test_a_corrupt_evaluation_sample_is_a_padding_row_named_and_counted(val_folders, backend, caplog):
    """Two ranks: the pass completes; each corrupt item's row has weight 0 (left out like padding),
    its skip is reported once by the rank that owns it (not again by the other rank's padding row,
    which is the corrupt item 0's position too) and logged with shard and key; all else is intact."""
    from xray_pretrain.data.badsamples import skipped_metrics

    _, folder, keys, bad = val_folders
    rows, skipped = {}, []
    with caplog.at_level("WARNING", logger="xray_pretrain.data.badsamples"):
        for rank in (0, 1):
            loader, batches = val_pass(folder, backend, rank, 2)
            assert len(batches) == len(loader) == 2 and all("bad" not in b for b in batches)
            skipped += loader.skipped
            for b in batches:
                assert b["image"].shape[0] == len(b["key"]) == 2
                assert np.isfinite(b["image"].numpy()).all()
                for key, position, weight in zip(b["key"], b["position"].tolist(), b["weight"].tolist()):
                    if weight > 0:
                        rows[position] = key
                    else:  # padding: the first intact item, never the corrupt one
                        assert key == keys[1]
    assert rows == {i: key for i, key in enumerate(keys) if key not in bad}
    summary = skipped_metrics(skipped)
    assert summary["num_skipped"] == 2 and [s["key"] for s in summary["skipped"]] == sorted(bad)
    for record in summary["skipped"]:
        assert record["shard"].startswith("phantom-val-") and bad[record["key"]] in record["reason"]
        line = next(
            r.getMessage() for r in caplog.records if f"{record['shard']}:{record['key']}" in r.getMessage()
        )
        assert "corrupt evaluation sample skipped" in line and "left out of the metrics" in line


@pytest.mark.parametrize("config", ["tiny_cpu", "classify_phantom"])
def test_evaluation_metrics_equal_the_metrics_of_the_remaining_samples(val_folders, config):
    """The task's evaluation of the corrupt folder == its evaluation of the clean folder with the
    damaged samples' rows weighted 0: the skipped rows count nowhere (pre-training's loss sums,
    the classifier's gathered predictions)."""
    from xray_pretrain.config import load_config
    from xray_pretrain.tasks import DataInfo, build_task

    clean, corrupt, _, bad = val_folders
    cfg = load_config(config, ["data.shards=[unused]", "model.image_size=[32,32]", "model.patch_size=8"])
    task = build_task(cfg)
    task.bind_data(DataInfo(["cardiomegaly", "effusion"], (32, 32), [], {}))
    torch.manual_seed(0)
    model = task.build_model().eval()
    _, damaged = val_pass(corrupt, "wds")
    _, intact = val_pass(clean, "wds")
    remaining = [
        {**b, "weight": b["weight"] * torch.tensor([float(k not in bad) for k in b["key"]])} for b in intact
    ]
    got = task.evaluate(model, damaged, torch.device("cpu"), torch.float32)
    expected = task.evaluate(model, remaining, torch.device("cpu"), torch.float32)
    assert got.keys() == expected.keys()
    for name, value in expected.items():
        assert got[name] == pytest.approx(value, rel=1e-6, nan_ok=True), name
    assert got["val_num_samples"] == 7 - len(bad)


def test_two_ranks_report_every_skip_and_score_as_one(val_folders):
    """The engine's evaluation on 2 ranks (each reads its share; predictions and skip records
    gathered): every rank gets both skips and the metrics of one process reading the whole split."""
    from ranks import run_ranks

    from xray_pretrain.config import load_config
    from xray_pretrain.data.badsamples import TooManySkipped
    from xray_pretrain.engine.trainer import evaluate_reporting_skips
    from xray_pretrain.tasks import DataInfo, build_task

    _, folder, _, bad = val_folders

    def evaluate(rank: int, world: int = 2, max_fraction: float = 0.5) -> dict:
        cfg = load_config(
            "classify_phantom", ["data.shards=[unused]", "model.image_size=[32,32]", "model.patch_size=8"]
        )
        task = build_task(cfg)
        task.bind_data(DataInfo(["cardiomegaly", "effusion"], (32, 32), [], {}))
        torch.manual_seed(0)
        model = task.build_model().eval()
        loader, _ = val_pass(folder, "wds", rank, world)
        return evaluate_reporting_skips(
            task, model, loader, torch.device("cpu"), torch.float32, split="val", max_fraction=max_fraction
        )

    def over_the_limit(rank: int, world: int = 2) -> str:
        try:
            evaluate(rank, world, max_fraction=0.2)  # 2 of 7 corrupt
        except TooManySkipped as error:
            return str(error)
        return "not stopped"

    one = evaluate(0, world=1)
    results = run_ranks(evaluate)
    stops = run_ranks(over_the_limit)  # every rank stops (none waits in a collective), with one message
    first = sorted(bad)[0]
    assert len(set(stops.values())) == 1 and "2 of the 7 samples of the 'val' split" in stops[0]
    assert f":{first}, " in stops[0] and "max_bad_fraction=0.2" in stops[0]
    assert one["val_num_skipped"] == 2 and [s["key"] for s in one["val_skipped"]] == sorted(bad)
    for metrics in results.values():
        assert metrics.keys() == one.keys()
        assert metrics["val_skipped"] == one["val_skipped"]
        for name, value in one.items():
            if name != "val_skipped":
                assert metrics[name] == pytest.approx(value, rel=1e-6, nan_ok=True), name
