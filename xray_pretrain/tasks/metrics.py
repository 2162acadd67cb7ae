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


def weighted_auroc(probs_N: np.ndarray, labels_N: np.ndarray, weights_RN: np.ndarray) -> np.ndarray:
    """AUROC of R weightings of the same N samples at once (R bootstrap resamples: weight = how often
    a sample was drawn), ties counted half, as sklearn's `roc_auc_score(..., sample_weight=w)`.

    probs_N, labels_N (1 / 0; NaN unknown, left out): (N,); weights_RN: (R, N) >= 0. Returns (R,),
    NaN where a weighting has no positive or no negative weight. One sort and two matrix products
    instead of R sklearn calls: a paired bootstrap needs thousands of AUROCs per class."""
    known = ~np.isnan(labels_N)
    probs, positive = probs_N[known], labels_N[known] == 1
    weights_RN = np.asarray(weights_RN, dtype=np.float64)[:, known]
    values, rank_N = np.unique(probs, return_inverse=True)  # distinct scores, ascending
    onehot_NU = np.zeros((probs.size, values.size))
    onehot_NU[np.arange(probs.size), rank_N] = 1.0
    pos_RU = (weights_RN * positive) @ onehot_NU  # positive weight at each distinct score
    neg_RU = (weights_RN * ~positive) @ onehot_NU
    below_RU = np.cumsum(neg_RU, axis=1) - neg_RU  # negative weight strictly below each score
    pairs_R = pos_RU.sum(1) * neg_RU.sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        return np.where(pairs_R > 0, (pos_RU * (below_RU + 0.5 * neg_RU)).sum(1) / pairs_R, np.nan)


def fast_mean_auroc(probs_NC: np.ndarray, labels_NC: np.ndarray) -> float | None:
    """Mean AUROC over the scorable classes (as `classification_metrics`' `mean_auroc`, None when no
    class can be scored) without sklearn's per-call overhead: for model selection in a loop."""
    ones_1N = np.ones((1, probs_NC.shape[0]))
    values = [weighted_auroc(probs_NC[:, c], labels_NC[:, c], ones_1N)[0] for c in range(probs_NC.shape[1])]
    values = [v for v in values if not np.isnan(v)]
    return float(np.mean(values)) if values else None


def bootstrap_interval(
    probs_a_SNC: np.ndarray,
    labels_NC: np.ndarray,
    probs_b_SNC: np.ndarray | None = None,
    num_resamples: int = 2000,
    seed: int = 0,
    level: float = 0.95,
) -> tuple[float, float]:
    """Bootstrap interval of model a's mean AUROC, or with `probs_b_SNC` the paired interval of the
    gap a minus b; each model scored on the same N test samples by S seeds (probs (S, N, C), labels
    (N, C) 1 / 0 / NaN).

    Each resample draws N test samples with replacement (the same draw for a and b: paired); its
    value is the mean over seeds of a's mean AUROC over classes (minus b's), classes unscorable in
    that draw left out. Returns the (1 - level) / 2 and (1 + level) / 2 percentiles."""
    num_seeds, num_samples, num_classes = probs_a_SNC.shape
    rng = np.random.default_rng(seed)
    draws_RN = rng.integers(0, num_samples, size=(num_resamples, num_samples))
    weights_RN = np.zeros((num_resamples, num_samples))
    np.add.at(weights_RN, (np.arange(num_resamples)[:, None], draws_RN), 1.0)

    def mean_auroc_R(probs_NC: np.ndarray) -> np.ndarray:
        auroc_RC = np.stack(
            [weighted_auroc(probs_NC[:, c], labels_NC[:, c], weights_RN) for c in range(num_classes)], 1
        )
        return np.nanmean(auroc_RC, 1)

    value_RS = np.stack(
        [mean_auroc_R(probs_a_SNC[s]) - (0 if probs_b_SNC is None else mean_auroc_R(probs_b_SNC[s]))
         for s in range(num_seeds)], 1,
    )  # fmt: skip
    tail = (1 - level) / 2 * 100
    low, high = np.percentile(value_RS.mean(1), [tail, 100 - tail])
    return float(low), float(high)
