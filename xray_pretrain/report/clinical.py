"""Clinical efficacy: CheXbert labels of generated and reference reports -> precision, recall, F1.

Only from weights the user supplies (``report.chexbert``: the ``chexbert.pth`` of stanfordmlgroup's
CheXbert, ``report.chexbert_vocab``: bert-base-uncased's ``vocab.txt``); nothing is downloaded, and
without them clinical efficacy is skipped with a log line. Needs the optional ``transformers``
package (``pip install 'xray_pretrain[clinical]'``).

The labeler is CheXbert's ``bert_labeler``: BERT-base, the [CLS] state, 13 heads of 4 classes
(0 blank, 1 positive, 2 negative, 3 uncertain) and one of 2 for No Finding, in :data:`CONDITIONS`
order; text prepared as CheXbert's ``tokenize`` (whitespace collapsed, ``[CLS] ... [SEP]``, cut at
512 ids). Both sides are labelled from the same cleaned text the language metrics score. As in
R2Gen-style clinical-efficacy tables, a condition counts as present when labelled positive (1);
precision / recall / F1 are micro-averaged over all (report, condition) pairs and also macro-averaged
over the 14 conditions.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np
import torch
from torch import nn

# CheXbert's head order (its src/constants.py).
CONDITIONS = (
    "Enlarged Cardiomediastinum", "Cardiomegaly", "Lung Opacity", "Lung Lesion", "Edema",
    "Consolidation", "Pneumonia", "Atelectasis", "Pneumothorax", "Pleural Effusion", "Pleural Other",
    "Fracture", "Support Devices", "No Finding",
)  # fmt: skip
POSITIVE = 1
MAX_IDS = 512


def clinical_efficacy(reference_labels: np.ndarray, generated_labels: np.ndarray) -> dict[str, float]:
    """(N, 14) CheXbert classes of references and generated reports -> ``ce_{precision,recall,f1}``
    micro and ``_macro``; a ratio with a zero denominator counts as 0 (scikit-learn's zero_division=0)."""
    ref_NC = np.asarray(reference_labels) == POSITIVE
    gen_NC = np.asarray(generated_labels) == POSITIVE
    if ref_NC.shape != gen_NC.shape or ref_NC.ndim != 2:
        raise ValueError(f"label arrays must both be (N, C), got {ref_NC.shape} and {gen_NC.shape}")
    tp_C = (ref_NC & gen_NC).sum(0).astype(float)
    fp_C = (~ref_NC & gen_NC).sum(0).astype(float)
    fn_C = (ref_NC & ~gen_NC).sum(0).astype(float)

    def prf(tp, fp, fn):
        precision = np.divide(tp, tp + fp, out=np.zeros_like(tp), where=(tp + fp) > 0)
        recall = np.divide(tp, tp + fn, out=np.zeros_like(tp), where=(tp + fn) > 0)
        denominator = precision + recall
        f1 = np.divide(2 * precision * recall, denominator, out=np.zeros_like(tp), where=denominator > 0)
        return precision, recall, f1

    micro = prf(np.array(tp_C.sum()), np.array(fp_C.sum()), np.array(fn_C.sum()))
    per_condition = prf(tp_C, fp_C, fn_C)
    out = {f"ce_{name}": float(value) for name, value in zip(("precision", "recall", "f1"), micro)}
    out.update(
        {f"ce_{name}_macro": float(v.mean()) for name, v in zip(("precision", "recall", "f1"), per_condition)}
    )
    return out


class _BertLabeler(nn.Module):
    """CheXbert's ``bert_labeler`` (attribute names as in its checkpoints: ``bert``, ``linear_heads``)."""

    def __init__(self, config) -> None:
        from transformers import BertModel

        super().__init__()
        self.bert = BertModel(config, add_pooling_layer=True)
        hidden = config.hidden_size
        self.linear_heads = nn.ModuleList([nn.Linear(hidden, 4) for _ in range(13)] + [nn.Linear(hidden, 2)])

    def forward(self, ids_BT: torch.Tensor, mask_BT: torch.Tensor) -> torch.Tensor:
        cls_BD = self.bert(ids_BT, attention_mask=mask_BT)[0][:, 0]
        return torch.stack([head(cls_BD).argmax(-1) for head in self.linear_heads], dim=1)  # (B, 14)


class ChexbertLabeler:
    """CheXbert from local files. ``bert_config``: transformers ``BertConfig`` kwargs; the default is
    bert-base-uncased's architecture (``BertConfig()``), which the released checkpoint needs."""

    def __init__(
        self, checkpoint: str | Path, vocab: str | Path, bert_config: dict | None = None, device="cpu"
    ):
        try:
            from transformers import BertConfig, BertTokenizer
        except ImportError:
            raise ValueError(
                "clinical efficacy needs the transformers package: pip install 'xray_pretrain[clinical]' "
                "(or unset report.chexbert)"
            ) from None
        checkpoint, vocab = Path(checkpoint), Path(vocab)
        for path, what in ((checkpoint, "report.chexbert"), (vocab, "report.chexbert_vocab")):
            if not path.is_file():
                raise ValueError(f"{what}={path} is not a file")
        self.device = torch.device(device)
        # One token per line, its id = its line number (BERT's vocab.txt).
        words = vocab.read_text(encoding="utf-8").splitlines()
        self.tokenizer = BertTokenizer(vocab={w: i for i, w in enumerate(words)}, do_lower_case=True)
        self.model = _BertLabeler(BertConfig(**(bert_config or {})))
        state = torch.load(checkpoint, map_location="cpu", weights_only=True)
        state = state.get("model_state_dict", state)
        # Saved from nn.DataParallel ('module.'); position_ids is a buffer only older transformers saved.
        state = {k.removeprefix("module."): v for k, v in state.items()}
        state.pop("bert.embeddings.position_ids", None)
        try:
            self.model.load_state_dict(state, strict=True)
        except RuntimeError as error:
            first = str(error).strip().splitlines()[0]
            raise ValueError(
                f"report.chexbert={checkpoint} does not fit CheXbert's labeler: {first}"
            ) from None
        self.model.to(self.device).eval()

    def _ids(self, text: str) -> list[int]:
        tokens = self.tokenizer.tokenize(" ".join(text.split()))
        # What CheXbert's encode_plus(tokens) gives for BERT: [CLS] ids [SEP].
        cls, sep = self.tokenizer.cls_token_id, self.tokenizer.sep_token_id
        ids = [cls, *self.tokenizer.convert_tokens_to_ids(tokens), sep]
        return ids if len(ids) <= MAX_IDS else ids[: MAX_IDS - 1] + [sep]  # an empty report: [CLS] [SEP]

    @torch.no_grad()
    def label(self, reports: Sequence[str], batch_size: int = 16) -> np.ndarray:
        """(N, 14) CheXbert classes: 0 blank, 1 positive, 2 negative, 3 uncertain (No Finding: 0/1)."""
        rows = []
        for start in range(0, len(reports), batch_size):
            encoded = [self._ids(text) for text in reports[start : start + batch_size]]
            width = max(map(len, encoded))
            ids_BT = torch.full((len(encoded), width), self.tokenizer.pad_token_id, dtype=torch.long)
            mask_BT = torch.zeros(len(encoded), width, dtype=torch.long)
            for i, ids in enumerate(encoded):
                ids_BT[i, : len(ids)] = torch.tensor(ids)
                mask_BT[i, : len(ids)] = 1
            rows.append(self.model(ids_BT.to(self.device), mask_BT.to(self.device)).cpu())
        return torch.cat(rows).numpy() if rows else np.zeros((0, len(CONDITIONS)), dtype=np.int64)

    def scores(self, references: Sequence[str], generated: Sequence[str]) -> dict[str, float]:
        return clinical_efficacy(self.label(references), self.label(generated))
