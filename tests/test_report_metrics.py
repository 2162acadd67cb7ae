"""Report metrics: BLEU, ROUGE-L and CIDEr-D on small strings against values computed by hand,
METEOR (one JVM run) against pycocoevalcap's own wrapper, and the no-Java / timeout paths."""

from __future__ import annotations

import logging
import math
import shutil

import pytest

from xray_pretrain.report.metrics import (
    METRIC_NAMES,
    r2gen_truncated_references,
    score_reports,
    score_systems,
)
from xray_pretrain.report.tokenizer import ReportTokenizer


def test_bleu_by_hand():
    scores = score_reports(["a b c e"], ["a b c d"], meteor=False)
    # Clipped n-gram precisions 3/4, 2/3, 1/2, 0/1; equal lengths: no brevity penalty.
    assert scores["bleu_1"] == pytest.approx(0.75)
    assert scores["bleu_2"] == pytest.approx(math.sqrt(0.75 * 2 / 3))
    assert scores["bleu_3"] == pytest.approx((0.75 * 2 / 3 * 0.5) ** (1 / 3))
    assert scores["bleu_4"] == pytest.approx(0.0, abs=1e-3)  # pycocoevalcap's 1e-15 smoothing
    short = score_reports(["a b c d"], ["a b"], meteor=False)
    assert short["bleu_1"] == pytest.approx(math.exp(1 - 4 / 2))  # brevity penalty only


def test_rouge_l_by_hand():
    # LCS('a b c', 'a x b y c z') = 3: P = 1, R = 1/2; pycocoevalcap's F with beta = 1.2.
    scores = score_reports(["a x b y c z"], ["a b c"], meteor=False)
    beta2 = 1.2**2
    assert scores["rouge_l"] == pytest.approx((1 + beta2) * 1 * 0.5 / (0.5 + beta2 * 1))


def test_cider_d_by_hand():
    # Two documents: every reference n-gram has df 1, idf log(2); unseen hypothesis n-grams df 1 too.
    # Item 1: 1- and 2-gram cosine 1, no 3/4-grams: 10 * (1 + 1 + 0 + 0) / 4 = 5.
    # Item 2: 1-grams {c, e} vs {c, d}: clipped dot log2^2 / (sqrt2 log2)^2 = 1/2; 2-grams 0: 1.25.
    scores = score_reports(["a b", "c d"], ["a b", "c e"], meteor=False)
    assert scores["cider"] == pytest.approx((5.0 + 1.25) / 2)


def test_whitespace_and_input_checks():
    a = score_reports(["the heart  is normal ."], [" the heart is normal . "], meteor=False)
    assert a["bleu_4"] == pytest.approx(1.0) and a["rouge_l"] == pytest.approx(1.0)
    assert list(a) == list(METRIC_NAMES) and a["meteor"] is None
    with pytest.raises(ValueError, match="2 references but 1 generated"):
        score_reports(["a", "b"], ["a"], meteor=False)
    with pytest.raises(ValueError, match="evaluation split is empty"):
        score_reports([], [], meteor=False)


def test_without_java_meteor_is_null_and_the_rest_computed(monkeypatch, caplog):
    monkeypatch.setenv("PATH", "/nonexistent")
    with caplog.at_level(logging.WARNING):
        scores = score_reports(["a b c e"], ["a b c d"])
    assert scores["meteor"] is None and scores["bleu_1"] == pytest.approx(0.75)
    assert "no `java` on PATH" in caplog.text


@pytest.mark.skipif(shutil.which("java") is None, reason="METEOR needs Java")
def test_meteor_timeout_kills_the_jvm(caplog):
    with caplog.at_level(logging.WARNING):
        scores = score_reports(["a b"], ["a b"], meteor_timeout_s=0.05)
    assert scores["meteor"] is None and "did not finish within 0.05 s" in caplog.text


@pytest.mark.skipif(shutil.which("java") is None, reason="METEOR needs Java")
def test_meteor_matches_pycocoevalcap_under_a_german_default_locale(monkeypatch):
    # The JVM is told -Duser.language=de before our own flags; ours come later on its command line.
    monkeypatch.setenv("JAVA_TOOL_OPTIONS", "-Duser.language=de -Duser.country=DE")
    refs = [
        "the heart is normal . lungs are clear .",
        "no acute disease .",
        "there is a small left effusion .",
    ]
    hyps = [
        "the heart is normal . lungs clear .",
        "no acute cardiopulmonary disease .",
        "small effusion on the left .",
    ]
    # Two systems through one JVM (score_systems): the hypotheses, and the references themselves.
    scores, perfect = score_systems(refs, [hyps, refs])
    # pycocoevalcap.meteor.Meteor().compute_score on the same items (Java 17, pycocoevalcap 1.2).
    assert scores["meteor"] == pytest.approx(0.42570821779184975, abs=1e-9)
    assert 0.9 < perfect["meteor"] <= 1.0 and perfect["bleu_4"] == pytest.approx(1.0)
    without_meteor = {**scores, "meteor": None}
    assert score_reports(refs, hyps, meteor=False) == without_meteor  # the other metrics as one system


def test_r2gen_truncated_references_are_the_decoded_training_ids():
    tok = ReportTokenizer.build(["Heart normal. Lungs clear."] * 3, "iu_xray", max_length=5)
    assert r2gen_truncated_references(tok, ["Heart enlarged. Lungs clear."]) == [
        "heart <unk> . lungs"
    ]  # <bos> + 4 words, no <eos>


def test_cider_d_reward_equals_pycocoevalcap_on_its_corpus():
    """Self-critical training's CIDEr-D (document frequencies fixed from a corpus) gives, per item,
    exactly pycocoevalcap's scores when that corpus is the scored references; with the training
    references as corpus a phrase every report shares is worth nothing."""
    import random

    from pycocoevalcap.cider.cider import Cider

    from xray_pretrain.report.cider import CiderD

    rng = random.Random(0)
    words = [
        "the",
        "heart",
        "is",
        "normal",
        "no",
        "pleural",
        "effusion",
        "left",
        "right",
        "lower",
        "zone",
        "consolidation",
        ".",
        "lungs",
        "clear",
    ]
    refs = [" ".join(rng.choice(words) for _ in range(rng.randint(3, 30))) for _ in range(40)]
    hyps = [" ".join(rng.choice(words) for _ in range(rng.randint(1, 30))) for _ in range(40)]
    _, expected = Cider().compute_score(
        {i: [r] for i, r in enumerate(refs)}, {i: [h] for i, h in enumerate(hyps)}
    )
    assert CiderD(refs).scores(hyps, refs) == pytest.approx(list(expected), abs=1e-12)
    shared = CiderD(["heart normal . lungs clear", "heart normal . effusion"])
    assert shared.score("heart normal", "heart normal") == 0.0  # df = N: idf 0
    assert shared.score("lungs clear", "lungs clear") == pytest.approx(10.0 / 4 * 2)  # 1- and 2-grams
    with pytest.raises(ValueError, match="at least one reference"):
        CiderD([])
