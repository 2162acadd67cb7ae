"""Report tokenizer: R2Gen's cleaning (both variants), vocabulary thresholds, length, JSON round trip,
on hand-made strings and on the real IU X-ray reports of ../shared/cxr-corpus (R2Gen annotation layout)."""

from __future__ import annotations

import json

import pytest
from conftest import corpus_or_skip

from xray_pretrain.report.tokenizer import (
    BOS_ID,
    EOS_ID,
    UNK_ID,
    ReportTokenizer,
    clean_report,
)

MIMIC_STYLE = (
    "FINDINGS:\n\nPA and lateral views ___ of the chest.. The lungs are clear.  No effusion.\n"
    " IMPRESSION: 1. No acute process. 2. Stable cardiomegaly."
)


def iu_annotation_reports() -> dict[str, list[str]]:
    """split -> reports of every R2Gen-layout annotation file in the corpus (skip when absent)."""
    folder = corpus_or_skip() / "iu_xray_r2gen_annotation"
    files = sorted(folder.glob("*.json"))
    if not files:
        pytest.skip(f"no R2Gen annotation json in {folder}")
    reports: dict[str, list[str]] = {}
    for path in files:
        for split, entries in json.loads(path.read_text()).items():
            reports.setdefault(split.strip() or "test", []).extend(e["report"] for e in entries)
    return reports


def test_iu_cleaning_matches_r2gen_on_a_real_report():
    report = (
        "The lungs are clear bilaterally. Specifically, no evidence of focal consolidation, pneumothorax, "
        "or pleural effusion.. Cardio mediastinal silhouette is unremarkable. Visualized osseous "
        "structures of the thorax are without acute abnormality."
    )
    assert clean_report(report, "iu_xray") == (
        "the lungs are clear bilaterally . specifically no evidence of focal consolidation pneumothorax "
        "or pleural effusion . cardio mediastinal silhouette is unremarkable . visualized osseous "
        "structures of the thorax are without acute abnormality ."
    )


def test_r2gen_accidental_character_range_is_reproduced():
    # ':-\[' is the range ':'..'[' : '<', '=', '>', '?', '@' go, the hyphen stays.
    assert (
        clean_report("A <5 mm nodule @ T-spine (x-ray) => ok?", "iu_xray")
        == "a 5 mm nodule t-spine x-ray ok ."
    )


def test_list_markers_and_empty_sentences():
    # R2Gen drops '1. ', turns ' 2. ' into a sentence break and keeps the empty last sentence of
    # '. .' (here as a lone ' .': whitespace normalized).
    assert clean_report("1. No acute disease. 2. Stable. .", "iu_xray") == "no acute disease . stable . ."


def test_mimic_variant_joins_lines_and_underscores():
    assert clean_report(MIMIC_STYLE, "mimic_cxr") == (
        "findings pa and lateral views of the chest . the lungs are clear . no effusion . "
        "impression no acute process . stable cardiomegaly ."
    )
    # The IU X-ray cleaner does not join lines: 'effusion.\n IMPRESSION' is no sentence break there.
    assert "no effusion impression" in clean_report(MIMIC_STYLE, "iu_xray")


def test_min_count_unk_and_max_length():
    reports = ["Heart normal. Lungs clear."] * 3 + ["Heart enlarged."] * 2
    tok = ReportTokenizer.build(reports, "iu_xray")  # min_count 3, max_length 60 (R2Gen's IU defaults)
    assert (tok.min_count, tok.max_length) == (3, 60)
    assert tok.words == (".", "clear", "heart", "lungs", "normal")  # 'enlarged' seen twice: <unk>
    ids = tok.encode("Heart enlarged.")
    assert ids == [BOS_ID, tok.token_id("heart"), UNK_ID, tok.token_id("."), EOS_ID]
    assert tok.decode(ids) == "heart <unk> ."
    short = ReportTokenizer.build(reports, "iu_xray", min_count=1, max_length=4)
    # Cut as R2Gen's ids[:max_seq_length]: no <eos> for a report that did not end.
    assert short.encode("Heart normal. Lungs clear.") == [BOS_ID] + [
        short.token_id(w) for w in ("heart", "normal", ".")
    ]
    with pytest.raises(ValueError, match="unknown report cleaning variant"):
        ReportTokenizer.build(reports, "chexpert")


def test_save_load_round_trip(tmp_path):
    tok = ReportTokenizer.build(["Heart normal. Lungs clear."], "mimic_cxr", min_count=1)
    path = tok.save(tmp_path / "checkpoint")
    assert path.name == "tokenizer.json"
    loaded = ReportTokenizer.load(tmp_path / "checkpoint")
    assert loaded == tok and loaded.encode("lungs clear") == tok.encode("lungs clear")
    (tmp_path / "bad.json").write_text('{"format": "something else"}')
    with pytest.raises(ValueError, match="is not a xray_pretrain.report_tokenizer v1 file"):
        ReportTokenizer.load(tmp_path / "bad.json")


@pytest.mark.corpus
def test_real_iu_reports_clean_idempotently_and_round_trip():
    reports = iu_annotation_reports()
    everything = [r for split in reports.values() for r in split]
    assert len(everything) >= 10
    tok = ReportTokenizer.build(everything, "iu_xray", min_count=1, max_length=1000)
    for report in everything:
        cleaned = tok.clean(report)
        assert cleaned.endswith(" .") and cleaned == cleaned.lower() and "  " not in cleaned
        assert tok.clean(cleaned) == cleaned  # cleaning its own output changes nothing
        ids = tok.encode(report)
        assert UNK_ID not in ids and ids[-1] == EOS_ID
        assert tok.decode(ids) == cleaned  # exact round trip: every word is in the vocabulary


@pytest.mark.corpus
def test_real_iu_vocabulary_from_the_training_split_only():
    reports = iu_annotation_reports()
    tok = ReportTokenizer.build(reports["train"], "iu_xray")  # R2Gen's threshold 3
    train_counts: dict[str, int] = {}
    for report in reports["train"]:
        for word in clean_report(report, "iu_xray").split():
            train_counts[word] = train_counts.get(word, 0) + 1
    assert set(tok.words) == {w for w, n in train_counts.items() if n >= 3}
    assert {"the", "heart", "lungs", "."} <= set(tok.words)
    # A test report: words below the threshold or never seen in training come back as <unk>.
    test_report = reports["test"][0]
    decoded = tok.decode(tok.encode(test_report)).split()
    expected = [w if w in tok.words else "<unk>" for w in clean_report(test_report, "iu_xray").split()]
    assert decoded == expected[: tok.max_length - 2] and "<unk>" in decoded
