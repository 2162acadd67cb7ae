"""Multi-label classification metrics with scikit-learn, over every sample of a split.

Per class: AUROC, average precision, and F1 at a threshold chosen on validation (the F1-maximizing
probability) and applied unchanged to test. A class whose known labels in the split are all of one
kind (all positive or all negative) cannot be scored: its values are `None` (null in JSON), it is
left out of the means, and a warning names it. Never 0: an AUROC of 0 would mean a perfectly
inverted classifier. Unknown labels (NaN) never count.
"""

from __future__ import annotations

import warnings

import numpy as np


def _known(probs_N: np.ndarray, labels_N: np.ndarray) -> tuple[np.ndarray, np.ndarray] | None:
    """(probabilities, 0/1 labels) where the label is known, or None when one kind only."""
    known = ~np.isnan(labels_N)
    y = labels_N[known].astype(np.int64)
    if y.size == 0 or y.min() == y.max():
        return None
    return probs_N[known], y


def choose_thresholds(probs_NC: np.ndarray, labels_NC: np.ndarray) -> list[float | None]:
    """Per class, the probability threshold (predict positive at p >= t) that maximizes F1 on these
    samples; None for a class that cannot be scored."""
    from sklearn.metrics import precision_recall_curve

    thresholds = []
    for c in range(probs_NC.shape[1]):
        pair = _known(probs_NC[:, c], labels_NC[:, c])
        if pair is None:
            thresholds.append(None)
            continue
        precision, recall, cuts = precision_recall_curve(pair[1], pair[0])
        f1 = 2 * precision[:-1] * recall[:-1] / np.maximum(precision[:-1] + recall[:-1], 1e-12)
        thresholds.append(float(cuts[int(np.argmax(f1))]))
    return thresholds


def classification_metrics(
    probs_NC: np.ndarray, labels_NC: np.ndarray, names: list[str], thresholds: list[float | None]
) -> dict[str, float | None]:
    """Flat metrics: `auroc/NAME`, `ap/NAME`, `f1/NAME` (None where unscorable), their means over
    the scorable classes (`mean_auroc`, `mean_ap`, `mean_f1`; None if none is), `num_samples`.

    probs_NC: (N, C) probabilities; labels_NC: (N, C) 1 / 0 / NaN unknown; thresholds: per class."""
    from sklearn.metrics import average_precision_score, f1_score, roc_auc_score

    out: dict[str, float | None] = {}
    unscorable = []
    for c, name in enumerate(names):
        pair = _known(probs_NC[:, c], labels_NC[:, c])
        if pair is None:
            unscorable.append(name)
            out[f"auroc/{name}"] = out[f"ap/{name}"] = out[f"f1/{name}"] = None
            continue
        probs, y = pair
        out[f"auroc/{name}"] = float(roc_auc_score(y, probs))
        out[f"ap/{name}"] = float(average_precision_score(y, probs))
        threshold = thresholds[c]
        out[f"f1/{name}"] = None if threshold is None else float(f1_score(y, probs >= threshold))
    if unscorable:
        warnings.warn(
            f"{', '.join(unscorable)}: one kind of known label only in this split: AUROC/AP/F1 null, "
            "left out of the means",
            stacklevel=2,
        )
    for metric in ("auroc", "ap", "f1"):
        values = [out[f"{metric}/{n}"] for n in names if out[f"{metric}/{n}"] is not None]
        out[f"mean_{metric}"] = float(np.mean(values)) if values else None
    out["num_samples"] = float(probs_NC.shape[0])
    return out
