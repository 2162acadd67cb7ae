"""CIDEr-D per report against a fixed document-frequency corpus: the reward of self-critical training.

pycocoevalcap's ``Cider`` takes its document frequencies from the references it is asked to score,
so one call per sampled batch would weigh n-grams by that batch alone. Self-critical training
(Rennie et al. 2017, and ruotianluo/self-critical.pytorch's ``CiderD``) fixes them once, from the
training split's references. This class does that and otherwise computes exactly what
pycocoevalcap 1.2's ``CiderScorer`` computes (tests compare the two on the same corpus): n-grams
1..4, tf-idf vectors with idf ``log(N) - log(max(1, df))``, clipped cosine per n, a Gaussian
length penalty (sigma 6; lengths counted as pycocoevalcap counts them, in bigrams, which leaves
the difference of two lengths the same), the mean over n, x10.

Texts are cleaned reports split on whitespace (:mod:`xray_pretrain.report.metrics`' convention).
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Iterable, Sequence

NGRAM_ORDERS = 4
SIGMA = 6.0


def _ngrams(text: str) -> Counter:
    words = text.split()
    return Counter(
        tuple(words[i : i + n]) for n in range(1, NGRAM_ORDERS + 1) for i in range(len(words) - n + 1)
    )


class CiderD:
    """``CiderD(training_references).scores(hypotheses, references)`` -> CIDEr-D of each pair."""

    def __init__(self, corpus: Iterable[str]) -> None:
        self.document_frequency: Counter = Counter()
        num_documents = 0
        for text in corpus:
            self.document_frequency.update(set(_ngrams(text)))
            num_documents += 1
        if num_documents == 0:
            raise ValueError("CIDEr-D needs at least one reference report for its document frequencies")
        self.log_num_documents = math.log(float(num_documents))

    def _vector(self, text: str) -> tuple[list[dict], list[float], int]:
        """Per n: {n-gram: tf * idf}, its norm; and the length (pycocoevalcap's: its bigram count)."""
        vectors: list[dict] = [{} for _ in range(NGRAM_ORDERS)]
        norms = [0.0] * NGRAM_ORDERS
        length = 0
        for ngram, term_frequency in _ngrams(text).items():
            n = len(ngram) - 1
            weight = term_frequency * (
                self.log_num_documents - math.log(max(1.0, self.document_frequency[ngram]))
            )
            vectors[n][ngram] = weight
            norms[n] += weight * weight
            if n == 1:
                length += term_frequency
        return vectors, [math.sqrt(x) for x in norms], length

    def score(self, hypothesis: str, reference: str) -> float:
        vec_h, norm_h, len_h = self._vector(hypothesis)
        vec_r, norm_r, len_r = self._vector(reference)
        penalty = math.exp(-((len_h - len_r) ** 2) / (2 * SIGMA**2))
        total = 0.0
        for n in range(NGRAM_ORDERS):
            dot = sum(min(w, vec_r[n].get(g, 0.0)) * vec_r[n].get(g, 0.0) for g, w in vec_h[n].items())
            if norm_h[n] != 0 and norm_r[n] != 0:
                dot /= norm_h[n] * norm_r[n]
            total += dot * penalty
        return 10.0 * total / NGRAM_ORDERS

    def scores(self, hypotheses: Sequence[str], references: Sequence[str]) -> list[float]:
        if len(hypotheses) != len(references):
            raise ValueError(f"{len(hypotheses)} hypotheses but {len(references)} references")
        return [self.score(h, r) for h, r in zip(hypotheses, references)]
