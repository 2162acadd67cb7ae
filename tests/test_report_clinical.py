"""Clinical efficacy: precision / recall / F1 by hand, and CheXbert loading from a checkpoint in
CheXbert's own format (a tiny BERT here: the real weights are the user's to supply)."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from xray_pretrain.report.clinical import CONDITIONS, ChexbertLabeler, clinical_efficacy

TINY_BERT = dict(
    vocab_size=12, hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
    max_position_embeddings=64,
)  # fmt: skip


def test_precision_recall_f1_by_hand():
    # 3 reports, 2 conditions; positive = 1 (negative 2 and uncertain 3 count as absent).
    ref = np.array([[1, 2], [1, 1], [0, 3]])
    gen = np.array([[1, 1], [2, 1], [1, 0]])
    scores = clinical_efficacy(ref, gen)
    # condition 0: tp 1 (row 0), fn 1 (row 1), fp 1 (row 2); condition 1: tp 1 (row 1), fp 1 (row 0)
    assert scores["ce_precision"] == pytest.approx(2 / 4) and scores["ce_recall"] == pytest.approx(2 / 3)
    assert scores["ce_f1"] == pytest.approx(2 * 0.5 * (2 / 3) / (0.5 + 2 / 3))
    assert scores["ce_recall_macro"] == pytest.approx((0.5 + 1.0) / 2)
    assert scores["ce_precision_macro"] == pytest.approx((0.5 + 0.5) / 2)


def chexbert_checkpoint(tmp_path, drop: str | None = None):
    """A CheXbert-format checkpoint (DataParallel 'module.' keys) whose heads ignore the text: head i
    answers class i % 4 (No Finding: 1), so the labels prove which weights landed where."""
    pytest.importorskip("transformers")
    from transformers import BertConfig

    from xray_pretrain.report.clinical import _BertLabeler

    torch.manual_seed(0)
    model = _BertLabeler(BertConfig(**TINY_BERT))
    for i, head in enumerate(model.linear_heads):
        torch.nn.init.zeros_(head.weight)
        torch.nn.init.zeros_(head.bias)
        head.bias.data[1 if i == 13 else i % 4] = 1.0
    state = {f"module.{k}": v for k, v in model.state_dict().items() if k != drop}
    torch.save({"model_state_dict": state, "epoch": 1}, tmp_path / "chexbert.pth")
    words = [
        "[PAD]",
        "[UNK]",
        "[CLS]",
        "[SEP]",
        "[MASK]",
        "no",
        "effusion",
        "cardiomegaly",
        "heart",
        ".",
        "normal",
        "is",
    ]
    (tmp_path / "vocab.txt").write_text("\n".join(words) + "\n")
    return tmp_path / "chexbert.pth", tmp_path / "vocab.txt"


def test_chexbert_labels_from_a_checkpoint_in_its_format(tmp_path):
    checkpoint, vocab = chexbert_checkpoint(tmp_path)
    labeler = ChexbertLabeler(checkpoint, vocab, bert_config=TINY_BERT)
    labels = labeler.label(["no effusion .", "cardiomegaly . heart is normal .", ""])
    expected = [1 if i == 13 else i % 4 for i in range(len(CONDITIONS))]
    assert labels.shape == (3, 14) and (labels == np.array(expected)).all()
    assert labeler._ids("No  effusion.") == [2, 5, 6, 9, 3]  # [CLS] no effusion . [SEP], lower-cased
    assert labeler.scores(["a"], ["b"])["ce_f1"] == pytest.approx(1.0)  # same labels on both sides


def test_chexbert_checkpoint_that_does_not_fit_is_a_clear_error(tmp_path):
    checkpoint, vocab = chexbert_checkpoint(tmp_path, drop="linear_heads.13.bias")
    with pytest.raises(ValueError, match="does not fit CheXbert's labeler: Error"):
        ChexbertLabeler(checkpoint, vocab, bert_config=TINY_BERT)
    with pytest.raises(ValueError, match="report.chexbert_vocab=.* is not a file"):
        ChexbertLabeler(checkpoint, tmp_path / "missing.txt", bert_config=TINY_BERT)
