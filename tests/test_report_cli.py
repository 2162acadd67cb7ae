"""Report generation through the commands: `finetune` (selection on validation BLEU-4, test scored once)
-> `evaluate` (metrics + key/reference/generated CSV) -> `predict` on raw phantom DICOMs and a real
chest DICOM; the tokenizer saved with the checkpoint survives resume and export."""

from __future__ import annotations

import csv
import json
import shutil
from pathlib import Path

import pytest
import torch
from conftest import CORPUS, copy_checkpoint, predict_shard_sources

from xray_pretrain.cli import main as cli_main
from xray_pretrain.config import load_config
from xray_pretrain.engine import checkpoint, manifest
from xray_pretrain.engine.trainer import train
from xray_pretrain.inference import TrainedModel, load_trained, predict_file, predict_inputs
from xray_pretrain.report.tokenizer import ReportTokenizer
from xray_pretrain.tasks import build_task

pytestmark = [pytest.mark.slow, pytest.mark.usefixtures("one_cpu_thread")]

# The packaged demo config at the test shards' size (64 px, patch 8), a few steps, no Java (METEOR
# has its own tests), beam 2 so that beam search runs through the engine's forward too.
BASE = [
    "model.image_size=[64,64]",
    "model.patch_size=8",
    "log.progress=false",
    "train.micro_batch=8",
    "train.global_batch=16",
    "train.epochs=null",
    "train.zero_stage=2",  # the packaged config's ZeRO-0 has nothing to consolidate: test the harder case
    "data.num_workers=0",
    "report.meteor=false",
    "report.beam_size=2",
    "report.decoder_dim=32",
    "report.decoder_heads=2",
    "report.decoder_depth=1",
]
REAL_CHEST = "pydicom-data/chest/RG1_J2KI.dcm"  # as tests/test_corpus.py


def _overrides(shards: Path, out: Path, extra: list[str]) -> list[str]:
    return [*BASE, f"data.shards=[{shards}]", f"log.out_dir={out}", *extra]


@pytest.fixture(scope="module")
def report_run(tmp_path_factory, zero2_run, phantom_shards) -> Path:
    """`xray-pretrain finetune --config report_phantom` from the ZeRO-2 pre-training run: 4 steps,
    validation (and a `best` candidate) every 2."""
    out = tmp_path_factory.mktemp("report")
    pretrained, _ = zero2_run
    extra = [f"init.weights={pretrained}", "train.steps=4", "log.val_every=2", "checkpoint.every=2"]
    assert cli_main(["finetune", "--config", "report_phantom", *_overrides(phantom_shards, out, extra)]) == 0
    return out


def test_finetune_selects_on_validation_bleu4_and_scores_the_test_split_once(report_run):
    metrics = json.loads((report_run / "metrics.json").read_text())
    summary = json.loads((report_run / "train_summary.json").read_text())
    assert metrics["selected_on"] == "val val_bleu_4 (max)" and metrics["best_step"] in (2, 4)
    assert metrics["test"] == summary["test"] and metrics["test"]["test_num_reports"] > 0
    assert {"test_bleu_4", "test_rouge_l", "test_cider"} <= metrics["test"].keys()
    assert metrics["test"]["test_meteor"] is None  # report.meteor=false: null, never a made-up number
    best = report_run / "checkpoints" / checkpoint.BEST_TAG
    info = json.loads((best / checkpoint.INFERENCE_NAME).read_text())
    assert info["task"] == "report" and info["views"] == 1 and info["section"] == "findings"
    assert ReportTokenizer.from_json(info["tokenizer"]).vocab_size > 4


def test_select_metric_is_configurable():
    cfg = load_config("report_phantom", ["data.shards=[unused]", "report.select_metric=cider"])
    assert build_task(cfg).selection == ("val_cider", "max")
    with pytest.raises(ValueError, match="report.select_metric='loss'"):
        load_config("report_phantom", ["data.shards=[unused]", "report.select_metric=loss"])


def test_evaluate_reproduces_the_test_scores_and_writes_the_reports(report_run, tmp_path, capsys):
    """The checkpoint scored by one plain process == the engine's test evaluation of it."""
    out = tmp_path / "test.json"
    assert cli_main(["evaluate", "--checkpoint", str(report_run), "--out", str(out)]) == 0
    printed = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    result = json.loads(out.read_text())
    engine = json.loads((report_run / "metrics.json").read_text())["test"]
    for name, value in result["metrics"].items():
        assert value == pytest.approx(engine[f"test_{name}"], abs=1e-9), name
    assert printed["cider"] == result["metrics"]["cider"]
    rows = list(csv.DictReader(open(tmp_path / "test.csv")))
    assert len(rows) == result["metrics"]["num_reports"] and list(rows[0]) == [
        "key",
        "reference",
        "generated",
    ]
    assert all(r["reference"] and r["reference"] == r["reference"].lower() for r in rows)  # cleaned text


def test_predict_on_phantom_dicoms_writes_the_reports_evaluate_generated(
    report_run, phantom_shards, tmp_path, capsys
):
    """No drift between the shard path and the raw-file path: a raw DICOM through `predict` gets the
    report its shard sample got through `evaluate`."""
    assert cli_main(["evaluate", "--checkpoint", str(report_run), "--out", str(tmp_path / "t.json")]) == 0
    generated = {r["key"]: r["generated"] for r in csv.DictReader(open(tmp_path / "t.csv"))}
    keys = sorted(generated)[:4]
    lines = predict_shard_sources(report_run, phantom_shards, keys, capsys)
    assert [line["task"] for line in lines] == ["report"] * len(keys)
    assert [line["report"] for line in lines] == [generated[k] for k in keys]


def test_predict_refuses_a_pair_for_a_one_view_model(report_run, phantom_shards, capsys):
    a, b = [r["source_path"] for r in csv.DictReader(open(phantom_shards / "id_map.csv"))][:2]
    assert cli_main(["predict", "--checkpoint", str(report_run), a, f"{a},{b}"]) == 2
    captured = capsys.readouterr()
    assert captured.out == ""  # refused before any file is read
    error = [line for line in captured.err.splitlines() if "error" in line]  # (DeepSpeed logs its loading)
    assert len(error) == 1 and error[0].startswith("xray-pretrain predict: error:")
    assert "reads one image per argument" in error[0] and "report.views=2" in error[0]


def test_predict_writes_a_report_for_a_real_chest_dicom(report_run, tmp_path, capsys):
    if not CORPUS.is_dir():
        pytest.skip(f"real chest X-ray corpus not found at {CORPUS} (it lives beside the repo in ../shared)")
    broken = tmp_path / "broken.dcm"
    broken.write_bytes(b"\0" * 128 + b"DICM" + b"\x02\x00\x10\x00garbage")
    files = [str(CORPUS / REAL_CHEST), str(broken)]
    capsys.readouterr()
    assert cli_main(["predict", "--checkpoint", str(report_run), *files]) == 1
    real, bad = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert real["file"] == files[0] and real["task"] == "report" and real["report"].strip()
    words = set(load_trained(report_run, "cpu").task.tokenizer.words) | {"<unk>"}
    assert set(real["report"].split()) <= words
    assert bad["file"] == files[1] and bad["error"]


def test_a_two_view_model_reads_frontal_lateral_pairs(report_run, phantom_shards):
    """`FRONTAL,LATERAL` -> the (1, 2, 1, H, W) input of a views=2 generator; one image is refused."""
    one_view = load_trained(report_run, "cpu")
    cfg = load_config("report_phantom", _overrides(phantom_shards, report_run, ["report.views=2"]))
    task = build_task(cfg)
    task.bind_tokenizer(one_view.task.tokenizer)
    two_view = TrainedModel(
        task.build_model().eval(), task, cfg, dict(one_view.info, views=2), report_run, torch.device("cpu")
    )
    a, b = [r["source_path"] for r in csv.DictReader(open(phantom_shards / "id_map.csv"))][:2]
    inputs = predict_inputs(two_view, [f"{a},{b}"])
    assert inputs == [[Path(a), Path(b)]]
    line = predict_file(two_view, inputs[0])
    assert line["file"] == f"{a},{b}" and line["task"] == "report" and isinstance(line["report"], str)
    with pytest.raises(ValueError, match="give FRONTAL,LATERAL in one argument"):
        predict_inputs(two_view, [a])


def test_tokenizer_survives_resume_and_export(report_run, phantom_shards, tmp_path, capsys):
    """A resumed run keeps its checkpoint's tokenizer (here with its last word renamed: a rebuilt one
    would have the real word), and the export holds the same tokenizer as a file its model card names."""
    run = tmp_path / "resumed"
    copy_checkpoint(report_run, "step00000004", run)  # with its best/, as the run folder holds them
    shutil.copytree(
        report_run / "checkpoints" / checkpoint.BEST_TAG, run / "checkpoints" / checkpoint.BEST_TAG
    )
    info_path = run / "checkpoints" / "step00000004" / checkpoint.INFERENCE_NAME
    info = json.loads(info_path.read_text())
    words = info["tokenizer"]["words"]
    words[-1] += "zz"  # still sorted and the same size, a word no training report has
    info_path.write_text(json.dumps(info))
    # A deliberate edit, not damage: record it in the checkpoint's manifest, or resume would skip it.
    records = manifest.read_manifest(info_path.parent)
    records[checkpoint.INFERENCE_NAME] = manifest.file_record(info_path)
    manifest.write_manifest(info_path.parent, records)
    extra = ["checkpoint.resume=auto", "train.steps=6", "log.val_every=6", "checkpoint.every=6"]
    summary = train(load_config("report_phantom", _overrides(phantom_shards, run, extra)))
    assert summary["steps"] == 6
    resumed = json.loads((run / "checkpoints" / "step00000006" / checkpoint.INFERENCE_NAME).read_text())
    assert resumed["tokenizer"] == info["tokenizer"]

    export = tmp_path / "export"
    assert cli_main(["export", "--checkpoint", str(report_run), "--out", str(export)]) == 0
    saved = json.loads((report_run / "checkpoints" / "best" / checkpoint.INFERENCE_NAME).read_text())
    assert ReportTokenizer.load(export).to_json() == saved["tokenizer"]
    card = (export / "README.md").read_text()
    assert (
        "## Report generation" in card and "`tokenizer.json`" in card and "report_decoder.safetensors" in card
    )
    config = json.loads((export / "config.json").read_text())
    assert config["xray_pretrain"]["report"]["decoder"]["dim"] == 32


def test_demo_scores_every_split_of_held_out_shards_with_its_controls(report_run, phantom_shards):
    """The demo's report stage scoring (demo_report.score_heldout), here with the training folder as
    the held-out one: every item of every split scored, the controls beside, the reports in a CSV, and
    the shuffled control fed only other studies' images."""
    from xray_pretrain.data.shards import SplitTable, open_folders
    from xray_pretrain.demo_report import REPORT_KEYS, SPLITS, other_study_order, score_heldout

    scored = score_heldout(report_run, phantom_shards, phantom_shards)
    tables = [SplitTable(open_folders([str(phantom_shards)]), split) for split in SPLITS]
    assert scored["num_reports"] == sum(sum(t.folder_sizes) for t in tables)
    report = scored["report"]
    assert set(report) == {*REPORT_KEYS, "baseline", "shuffled_cider"} and set(report["baseline"]) == set(
        REPORT_KEYS
    )
    assert all(isinstance(report[k], float) for k in ("bleu_4", "rouge_l", "cider", "shuffled_cider"))
    rows = list(csv.DictReader(open(scored["csv"])))
    assert len(rows) == scored["num_reports"] and all(r["reference"] for r in rows)
    keys = [r["key"] for r in rows]
    other = other_study_order(keys, tables)
    assert sorted(other) == list(range(len(keys))) and all(i != j for i, j in enumerate(other))
