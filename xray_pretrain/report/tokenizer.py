"""Word-level report tokenizer with R2Gen's cleaning, built from the training split's reports.

Cleaning reproduces R2Gen's ``modules/tokenizers.py`` (``clean_report_iu_xray`` /
``clean_report_mimic_cxr``) step for step, so vocabularies, token sequences and the metric inputs
equal those behind published IU X-ray and MIMIC-CXR tables:

1. a fixed chain of ``str.replace`` calls (the same calls, in the same order, the same number of
   times: ``'..' -> '.'`` three times for IU X-ray, eight for MIMIC-CXR; list markers ``'1. '``,
   ``'. 2. '`` ... ``' 5. '``; MIMIC-CXR also joins lines and shortens ``'__'`` and double spaces),
   then ``strip().lower().split('. ')`` into sentences;
2. per sentence: drop ``" / \\ '``, strip, lower, and delete the characters of R2Gen's regex
   ``[.,?;*!%^&_+():-\\[\\]{}]``;
3. join the sentences with ``' . '`` and end with ``' .'``.

**R2Gen's accidental range is reproduced.** In that character class ``:-\\[`` is a *range* from ``:``
(U+003A) to ``[`` (U+005B), not the three characters ``:``, ``-``, ``[``. So R2Gen (and this module)
also deletes ``< = > ? @`` and ``A``-``Z`` (moot: the text is lower-cased first), and does **not**
delete the hyphen: ``t-spine`` and ``x-ray`` stay one word each, ``<5 mm`` becomes ``5 mm``. Fixing
it would change the vocabulary and every metric against published numbers, so it is kept on purpose.

Differences from R2Gen (none changes which words are in the vocabulary or what the cleaned text is):

- Whitespace is normalized: R2Gen keeps an empty sentence (its ``!= []`` filter compares a string
  with a list, so it never filters) and its output can then hold double spaces, e.g. ``'... findings
  .  .'`` for a report ending in ``'. .'``. Here the cleaned text is ``' '.join(tokens)`` of the same
  tokens, so ``decode(encode(text)) == clean(text)`` holds exactly.
- Ids: R2Gen uses id 0 as begin, end *and* padding, and numbers the sorted vocabulary (``<unk>``
  sorted in among the words) from 1. Here ``<pad>``=0, ``<bos>``=1, ``<eos>``=2, ``<unk>``=3, then the
  words in sorted order from 4: end and padding are told apart.
- Length: as R2Gen's ``tokenizer(report)[:max_seq_length]``, ``max_length`` counts every id including
  ``<bos>`` and ``<eos>``, and a report that does not fit is cut with *no* ``<eos>`` (it did not end
  there). 60 for IU X-ray, 100 for MIMIC-CXR by default.
- Minimum count as R2Gen's ``threshold``: a word seen fewer than ``min_count`` times (3 IU X-ray,
  10 MIMIC-CXR) in the training reports is ``<unk>``.
- Saved as JSON (:data:`TOKENIZER_FILE`) next to a checkpoint and an export, instead of being
  rebuilt from the annotation file at every start.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

PAD, BOS, EOS, UNK = "<pad>", "<bos>", "<eos>", "<unk>"
SPECIAL_TOKENS = (PAD, BOS, EOS, UNK)
PAD_ID, BOS_ID, EOS_ID, UNK_ID = range(len(SPECIAL_TOKENS))
TOKENIZER_FILE = "tokenizer.json"
FORMAT = "xray_pretrain.report_tokenizer"
FORMAT_VERSION = 1

# variant -> (min_count, max_length): R2Gen's --threshold and --max_seq_length per dataset.
VARIANT_DEFAULTS: dict[str, tuple[int, int]] = {"iu_xray": (3, 60), "mimic_cxr": (10, 100)}
VARIANTS = tuple(VARIANT_DEFAULTS)

# R2Gen's pattern verbatim, accidental ':'..'[' range included (see the module docstring).
_R2GEN_PUNCTUATION = re.compile("[.,?;*!%^&_+():-\\[\\]{}]")
_LIST_MARKERS = (
    ("1. ", ""),
    (". 2. ", ". "),
    (". 3. ", ". "),
    (". 4. ", ". "),
    (". 5. ", ". "),
    (" 2. ", ". "),
    (" 3. ", ". "),
    (" 4. ", ". "),
    (" 5. ", ". "),
)
# The exact replacement chains of R2Gen's two report cleaners, before strip().lower().split('. ').
_REPLACEMENTS: dict[str, tuple[tuple[str, str], ...]] = {
    "iu_xray": (("..", "."),) * 3 + _LIST_MARKERS,
    "mimic_cxr": (("\n", " "),)
    + (("__", "_"),) * 7
    + (("  ", " "),) * 6
    + (("..", "."),) * 8
    + _LIST_MARKERS,
}


def _clean_sentence(sentence: str) -> str:
    text = sentence.replace('"', "").replace("/", "").replace("\\", "").replace("'", "").strip().lower()
    return _R2GEN_PUNCTUATION.sub("", text)


def check_variant(variant: str) -> None:
    if variant not in VARIANT_DEFAULTS:
        raise ValueError(f"unknown report cleaning variant {variant!r}: use one of {VARIANTS}")


def clean_report(report: str, variant: str) -> str:
    """R2Gen's cleaned report (``iu_xray`` or ``mimic_cxr``), tokens joined by single spaces.

    ``'The heart is normal. No effusion.'`` -> ``'the heart is normal . no effusion .'``.
    Idempotent on its own output.
    """
    check_variant(variant)
    for old, new in _REPLACEMENTS[variant]:
        report = report.replace(old, new)
    sentences = [_clean_sentence(s) for s in report.strip().lower().split(". ")]
    return " ".join((" . ".join(sentences) + " .").split())


@dataclass(frozen=True)
class ReportTokenizer:
    """Cleaned report <-> ids. Build with :meth:`build` from training reports; persist with
    :meth:`save` / :meth:`load` (JSON)."""

    variant: str
    words: tuple[str, ...]  # the vocabulary without special tokens, sorted; ids from len(SPECIAL_TOKENS)
    min_count: int
    max_length: int
    _ids: dict[str, int] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        check_variant(self.variant)
        if self.max_length < 3:
            raise ValueError(f"report max_length={self.max_length} leaves no room for a word: use >= 3")
        if list(self.words) != sorted(set(self.words)) or set(self.words) & set(SPECIAL_TOKENS):
            raise ValueError("tokenizer words must be sorted, unique and contain no special token")
        tokens = SPECIAL_TOKENS + tuple(self.words)
        object.__setattr__(self, "_ids", {token: i for i, token in enumerate(tokens)})

    @classmethod
    def build(
        cls,
        reports: Iterable[str],
        variant: str,
        min_count: int | None = None,
        max_length: int | None = None,
    ) -> ReportTokenizer:
        """Vocabulary of the words seen at least ``min_count`` times in ``reports`` (the training
        split's), after cleaning. ``None`` takes the variant's R2Gen default."""
        check_variant(variant)
        default_count, default_length = VARIANT_DEFAULTS[variant]
        min_count = default_count if min_count is None else int(min_count)
        if min_count < 1:
            raise ValueError(f"report min_count={min_count} must be >= 1")
        counts = Counter(word for report in reports for word in clean_report(report, variant).split())
        if not counts:
            raise ValueError("no training reports to build the tokenizer from: check report.section")
        words = tuple(sorted(w for w, n in counts.items() if n >= min_count))
        return cls(variant, words, min_count, default_length if max_length is None else int(max_length))

    @property
    def vocab_size(self) -> int:
        return len(SPECIAL_TOKENS) + len(self.words)

    def clean(self, report: str) -> str:
        return clean_report(report, self.variant)

    def token_id(self, token: str) -> int:
        return self._ids.get(token, UNK_ID)

    def encode(self, report: str) -> list[int]:
        """``[<bos>, words..., <eos>]`` of the cleaned report, at most ``max_length`` ids; a longer
        report is cut without ``<eos>`` (as R2Gen)."""
        ids = [BOS_ID, *(self.token_id(w) for w in self.clean(report).split()), EOS_ID]
        return ids[: self.max_length]

    def decode(self, ids: Sequence[int]) -> str:
        """Words up to the first ``<eos>`` or ``<pad>``; ``<bos>`` skipped, unknown words as ``<unk>``."""
        tokens = SPECIAL_TOKENS + self.words
        words = []
        for i in ids:
            i = int(i)
            if i in (EOS_ID, PAD_ID):
                break
            if i != BOS_ID:
                words.append(tokens[i])
        return " ".join(words)

    def to_json(self) -> dict:
        return {
            "format": FORMAT,
            "version": FORMAT_VERSION,
            "variant": self.variant,
            "min_count": self.min_count,
            "max_length": self.max_length,
            "special_tokens": list(SPECIAL_TOKENS),
            "words": list(self.words),
        }

    @classmethod
    def from_json(cls, data: dict, source: str = "tokenizer") -> ReportTokenizer:
        if data.get("format") != FORMAT or data.get("version") != FORMAT_VERSION:
            raise ValueError(
                f"{source} is not a {FORMAT} v{FORMAT_VERSION} file "
                f"(format={data.get('format')!r}, version={data.get('version')!r})"
            )
        if tuple(data["special_tokens"]) != SPECIAL_TOKENS:
            raise ValueError(
                f"{source}: special tokens {data['special_tokens']} differ from {SPECIAL_TOKENS}"
            )
        return cls(data["variant"], tuple(data["words"]), int(data["min_count"]), int(data["max_length"]))

    def save(self, folder: str | Path) -> Path:
        """Write ``folder/tokenizer.json`` (a checkpoint or export folder); returns its path."""
        path = Path(folder) / TOKENIZER_FILE
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_suffix(".json.tmp")
        tmp.write_text(json.dumps(self.to_json(), indent=1) + "\n")
        tmp.replace(path)  # a crash mid-write never leaves a truncated tokenizer
        return path

    @classmethod
    def load(cls, path: str | Path) -> ReportTokenizer:
        """From ``tokenizer.json`` or the folder holding it."""
        path = Path(path)
        if path.is_dir():
            path = path / TOKENIZER_FILE
        if not path.is_file():
            raise ValueError(
                f"no report tokenizer at {path}: a report checkpoint or export holds {TOKENIZER_FILE}"
            )
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as error:
            raise ValueError(f"cannot parse {path}: {error}") from None
        return cls.from_json(data, str(path))
