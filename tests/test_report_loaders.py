"""Report text through both loader backends: items, view pairs, skipped studies, order and resume."""

from __future__ import annotations

import itertools
import json
import logging

import numpy as np
import pytest
import torch
from conftest import corpus_or_skip
from data_fixtures import needs_dali, write_shard_folder

from xray_pretrain.config import load_config
from xray_pretrain.data.config import DataConfig
from xray_pretrain.data.loader import build_train_loader, build_val_loader
from xray_pretrain.data.reports import ReportSpec, train_report_texts
from xray_pretrain.data.shards import ShardFolder, ShardReader, SplitTable
from xray_pretrain.report.studies import report_text

BACKENDS = ["wds", pytest.param("dali", marks=needs_dali)]
SIZE_HW = (40, 32)
GREY_LEVEL = 1 / 255


def study_meta(i: int, split: str) -> dict:
    """Train samples 0-11: studies s0..s4 are pairs (the odd sample PA, the even one LATERAL), s1
    without report text; sample 10 (PA) is a study alone, sample 11 a lateral without a report.
    Val samples 12-17: three pairs with reports."""
    study = f"{split}-s{i // 2}" if i < 10 or split == "val" else f"{split}-single{i}"
    view = "PA" if i % 2 else "LATERAL"
    empty = study == "train-s1" or i == 11
    report = {"findings": "" if empty else f"finding {study}", "impression": "" if empty else f"calm {study}"}
    return {"dataset": "fixture", "study": study, "view": view, "report": report}


@pytest.fixture(scope="module")
def study_shards(tmp_path_factory):
    root = tmp_path_factory.mktemp("studies")
    fixture = write_shard_folder(
        root, splits={"train": 12, "val": 6}, size_hw=SIZE_HW, seed=3, meta_fn=study_meta
    )
    return root, fixture


def keys_by_study(fixture, split: str) -> dict[str, dict[str, str]]:
    """study -> {view: key} of the fixture's `split`."""
    out: dict[str, dict[str, str]] = {}
    for key in fixture.keys(split):
        meta = fixture.samples[key].meta
        out.setdefault(meta["study"], {})[meta["view"]] = key
    return out


def val_batches(root, spec, backend, *, micro=2, rank=0, world=1, split=None):
    cfg = DataConfig(shards=[str(root)], backend=backend, num_workers=1 if backend == "dali" else 0)
    loader = build_val_loader(
        cfg, image_size=SIZE_HW, micro_batch=micro, rank=rank, world_size=world, whole_split=True,
        split=split, reports=spec,
    )  # fmt: skip
    return loader, list(loader)


def train_batches(root, spec, backend, num_batches, *, micro=2, accum=1, rank=0, world=1, start=0):
    cfg = DataConfig(
        shards=[str(root)], backend=backend, num_workers=1 if backend == "dali" else 0, hflip=True
    )
    loader = build_train_loader(
        cfg, image_size=(20, 17), micro_batch=micro, accum_steps=accum, rank=rank, world_size=world,
        seed=5, start_position=start, reports=spec,
    )  # fmt: skip
    return loader, list(itertools.islice(iter(loader), num_batches))


def rows(batches) -> list[tuple]:
    """(position, key, report, weight) per row."""
    return [
        (int(p), k, r, float(w))
        for b in batches
        for p, k, r, w in zip(b["position"], b["key"], b["report"], b["weight"])
    ]


@pytest.mark.parametrize("backend", BACKENDS)
def test_two_views_pair_frontal_then_lateral_with_the_study_report(study_shards, backend):
    """Validation at the stored size: slot 0 is the PA image's pixels, slot 1 the lateral's, the text is
    the study's findings; padding rows (2 ranks, 3 studies) carry '' and weight 0."""
    root, fixture = study_shards
    folder = ShardFolder(root)
    studies = keys_by_study(fixture, "val")
    spec = ReportSpec("findings", 2)
    loader, batches = val_batches(root, spec, backend)
    assert loader.report_counts["num_items"] == 3 and loader.num_samples == 3
    for batch in batches:
        assert batch["image"].shape[1:] == (2, 1, *SIZE_HW) and batch["roi"].shape == batch["image"].shape
        for image_2, key, text in zip(batch["image"].cpu(), batch["key"], batch["report"]):
            study = fixture.samples[key].meta["study"]
            assert key == studies[study]["PA"] and text == f"finding {study}"
            for slot, view in enumerate(("PA", "LATERAL")):
                source = fixture.samples[studies[study][view]].image / 65535.0
                stored = image_2[slot, 0].numpy() * folder.intensity_std + folder.intensity_mean
                np.testing.assert_allclose(stored, source, atol=1e-5, rtol=0)
    by_key = sorted(studies, key=lambda s: studies[s]["PA"])  # validation order: the frontal keys
    _, rank1 = val_batches(root, spec, backend, rank=1, world=2)
    assert [(r[1], r[2], r[3]) for r in rows(rank1)][:1] == [
        (studies[by_key[1]]["PA"], f"finding {by_key[1]}", 1.0)
    ]
    assert [(r[2], r[3]) for r in rows(rank1)][1:] == [("", 0.0)]


@needs_dali
@pytest.mark.parametrize("views, section", [(1, "both"), (2, "impression")])
def test_wds_and_dali_give_the_same_report_batches(study_shards, views, section):
    """Same keys, positions, texts, labels, roi; pixels within test_dali's tolerances (training crops)."""
    from test_dali import assert_same_rows

    root, _ = study_shards
    spec = ReportSpec(section, views)
    _, wds = train_batches(root, spec, "wds", 4, micro=2)
    _, dali = train_batches(root, spec, "dali", 4, micro=2)
    assert [b["report"] for b in wds] == [b["report"] for b in dali]
    assert wds[0]["image"].dim() == (5 if views == 2 else 4)
    assert_same_rows(wds, dali, ShardFolder(root).intensity_std, 1.3 * 2 * GREY_LEVEL)
    if views == 2:  # each view draws its own crop: the lateral is not the frontal's geometry
        assert not torch.equal(wds[0]["roi"][:, 0], wds[0]["roi"][:, 1])


def test_skipped_studies_are_counted_and_logged(study_shards, caplog):
    root, _ = study_shards
    with caplog.at_level(logging.INFO, logger="xray_pretrain.data.reports"):
        two, _ = train_batches(root, ReportSpec("findings", 2), "wds", 1)
        one, _ = train_batches(root, ReportSpec("findings", 1), "wds", 1)
    base = {"num_images": 12, "num_no_report": 3, "num_extra_images": 0, "num_report_conflicts": 0}
    assert two.report_counts == {
        **base, "num_items": 4, "num_missing_view": 1, "num_pairs_with_unknown_views": 0
    }  # fmt: skip
    assert one.report_counts == {
        **base, "num_items": 9, "num_missing_view": 0, "num_pairs_with_unknown_views": 0
    }  # fmt: skip
    logged = [r.getMessage() for r in caplog.records if "report items" in r.getMessage()]
    assert len(logged) == 2  # one line per grouping
    assert "4 items from 12 images" in logged[0] and "3 images without report text" in logged[0]
    assert "1 without a frontal+lateral pair" in logged[0]
    assert two.num_samples_per_epoch == 4 and one.num_samples_per_epoch == 9


@pytest.mark.parametrize("backend", BACKENDS)
def test_report_items_keep_order_resume_and_rank_rules(study_shards, backend):
    """Over the 9 one-view items: two ranks read disjoint positions, epoch 0 covers every item once,
    a resume at step 1 reads what the first run read there, and 1 rank with accumulation 2 reads
    the same items per step as 2 ranks."""
    root, _ = study_shards
    spec = ReportSpec("both", 1)
    per_rank = [rows(train_batches(root, spec, backend, 3, rank=r, world=2)[1]) for r in range(2)]
    positions = sorted(p for rank_rows in per_rank for p, *_ in rank_rows)
    assert positions == list(range(12))
    epoch0 = [k for rank_rows in per_rank for p, k, *_ in rank_rows if p < 9]
    assert len(set(epoch0)) == 9
    resumed = rows(train_batches(root, spec, backend, 2, rank=1, world=2, start=4)[1])
    assert resumed == per_rank[1][2:]
    single = rows(train_batches(root, spec, backend, 6, accum=2)[1])
    assert sorted(single) == sorted(per_rank[0] + per_rank[1])


def test_phantom_reports_match_their_json_and_feed_the_tokenizer(phantom_shards, caplog):
    """`xray-shard synth` writes a report per study: every training image is an item, its text is
    report_text(json report, section), and train_report_texts gives the same texts in table order,
    from the grouping the train loader then reuses (as the report task's select hook calls it)."""
    caplog.set_level(logging.INFO, logger="xray_pretrain.data.reports")
    folder = ShardFolder(phantom_shards)
    table = SplitTable([folder], "train")
    reader = ShardReader()
    expected = {
        table.key(0, i): report_text(table.metadata(reader, 0, i)["report"], "both")
        for i in range(table.folder_sizes[0])
    }
    assert all(expected.values())
    texts = train_report_texts(table, "both", 1)
    assert texts == [expected[table.key(0, i)] for i in range(table.folder_sizes[0])]
    cfg = DataConfig(shards=[str(phantom_shards)], backend="wds", num_workers=0)
    loader = build_train_loader(
        cfg, image_size=(32, 32), micro_batch=8, accum_steps=1, rank=0, world_size=1, seed=0,
        reports=ReportSpec("both", 1), select=lambda t: table,
    )  # fmt: skip
    assert loader.report_counts["num_items"] == len(expected) and loader.report_counts["num_no_report"] == 0
    assert sum("report items" in r.getMessage() for r in caplog.records) == 1  # grouped once, shared
    for batch in itertools.islice(iter(loader), 3):
        assert batch["report"] == [expected[k] for k in batch["key"]]


def test_real_iu_xray_annotation_pairs_each_studys_two_images(tmp_path):
    """R2Gen's IU X-ray annotation (../shared/cxr-corpus; no images there, so each listed PNG is
    written here: 0.png bright, 1.png dark) converted with `xray-shard convert --source iu-xray`:
    every study is one item holding exactly its two images in the annotation's `image_path` order
    (R2Gen's [0] then [1], whatever the salted keys' order; the annotation names no view, so every
    pair is counted as using view-less images), with the annotation's report."""
    from PIL import Image

    from data_tools.cli import main as shard_main

    annotation_path = corpus_or_skip() / "iu_xray_r2gen_annotation" / "annotation.subset.json"
    annotation = json.loads(annotation_path.read_text())
    source = tmp_path / "in"
    (source / "images").mkdir(parents=True)
    (source / "annotation.json").write_text(json.dumps(annotation))
    for entry in (e for entries in annotation.values() for e in entries):
        for n, image_path in enumerate(entry["image_path"]):
            (source / "images" / image_path).parent.mkdir(parents=True, exist_ok=True)
            pixels = 200 - 150 * n + np.arange(40 * 32).reshape(40, 32) % 32  # not flat: a real image's range
            Image.fromarray(pixels.astype(np.uint8)).save(source / "images" / image_path)
    argv = ["convert", "--input", str(source), "--source", "iu-xray", "--out", str(tmp_path / "shards"),
            "--long-side", "40", "--intensity", "raw", "--keep-paths", "--salt", "test", "--no-progress"]  # fmt: skip
    assert shard_main(argv) == 0
    table = SplitTable([ShardFolder(tmp_path / "shards")], "train")
    reader = ShardReader()
    source_of = {
        table.key(0, i): table.metadata(reader, 0, i)["source_id"] for i in range(table.folder_sizes[0])
    }
    pairs = {e["id"]: e for e in annotation["train"] if len(e["image_path"]) == 2}
    loader, batches = val_batches(tmp_path / "shards", ReportSpec("findings", 2), "wds", split="train")
    assert loader.num_samples == len(pairs) == loader.report_counts["num_pairs_with_unknown_views"] > 0
    seen, num_key_order_differs = set(), 0
    for batch in batches:
        for image_2, key, text in zip(batch["image"], batch["key"], batch["report"]):
            study = source_of[key].split("/")[1]
            entry, seen = pairs[study], seen | {study}
            first = next(k for k, s in source_of.items() if s == f"images/{entry['image_path'][0]}")
            assert key == first and text == " ".join(entry["report"].split())
            means = image_2.mean(dim=(1, 2, 3))
            assert means[0] > means[1]  # slot 0 is image_path[0] (written bright), slot 1 is [1]
            num_key_order_differs += key != min(k for k, s in source_of.items() if s.split("/")[1] == study)
    assert seen == set(pairs)
    assert num_key_order_differs > 0  # the salted keys alone would have put some pairs the other way


@pytest.mark.parametrize(
    "name, views, cleaning", [("report_iu_xray", 2, "iu_xray"), ("report_mimic_cxr", 1, "mimic_cxr")]
)
def test_packaged_report_configs_load_and_validate(name, views, cleaning):
    cfg = load_config(name, ["data.shards=[somewhere]"])
    assert cfg.task == "report" and (cfg.report.views, cfg.report.cleaning) == (views, cleaning)
    assert cfg.loader_reports() == ReportSpec("findings", views)
    assert cfg.train.global_batch % cfg.train.micro_batch == 0 and cfg.train.accum_steps(8) == 1
    assert cfg.optim.lr(cfg.train.global_batch) == pytest.approx(1e-4)  # R2Gen's lr, as the headers say


def test_report_section_is_validated_and_belongs_to_the_report_task():
    shards = "data.shards=[somewhere]"
    assert load_config(None, [shards, "task=report", "report.section=both"]).loader_reports() == ReportSpec(
        "both", 1
    )
    assert load_config(None, [shards, "task=classify"]).loader_reports() is None
    with pytest.raises(ValueError, match=r"report.views=3: use 1"):
        load_config(None, [shards, "task=report", "report.views=3"])
    with pytest.raises(ValueError, match=r"report\.\* is set but task=pretrain"):
        load_config(None, [shards, "report.views=2"])
