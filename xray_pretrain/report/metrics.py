"""Report metrics with the literature's own code: pycocoevalcap 1.2's BLEU-1..4, METEOR 1.5, ROUGE-L
and CIDEr-D.

Tokenization is R2Gen's: references and generated reports are cleaned reports
(:func:`xray_pretrain.report.tokenizer.clean_report`: lower case, punctuation removed, ``' . '``
between sentences) split on whitespace. pycocoevalcap's ``PTBTokenizer`` (a Java program) is not
used, so only METEOR needs Java. pycocoevalcap's ``Cider`` class is CIDEr-D (clipped n-gram counts,
Gaussian length penalty sigma=6, x10), with document frequencies from the references scored.

References are the *full* cleaned reports. R2Gen scores against references decoded from the
truncated, ``<unk>``-mapped token ids it trains on (``reports_ids[:, 1:]``), which drops the end of
long reports and turns rare words into ``<unk>`` on both sides, inflating scores;
:func:`r2gen_truncated_references` builds that variant for comparison, and its scores must carry
:data:`TRUNCATED_SUFFIX` in their names.

METEOR runs the jar pycocoevalcap bundles (``meteor-1.5.jar``, ``-l en -norm`` as pycocoevalcap
calls it) in a JVM started with an English locale (a German or French default locale prints
``0,25`` and breaks the parsing) and killed after a timeout. Without Java, or when the JVM fails,
``meteor`` is ``None`` and the reason is logged; the other metrics are still computed.
"""

from __future__ import annotations

import contextlib
import importlib.resources
import logging
import os
import shutil
import subprocess
import tempfile
import threading
from collections.abc import Sequence

log = logging.getLogger(__name__)

METRIC_NAMES = ("bleu_1", "bleu_2", "bleu_3", "bleu_4", "meteor", "rouge_l", "cider")
TRUNCATED_SUFFIX = "_r2gen_truncated"
METEOR_TIMEOUT_S = 600.0
# Java's own locale properties, and a C locale for the JVM's environment: numbers print as 0.25.
_JAVA_LOCALE = ("-Duser.language=en", "-Duser.country=US", "-Duser.region=US")


def _normalized(texts: Sequence[str], what: str) -> dict[int, list[str]]:
    """pycocoevalcap's input layout {i: [text]}; single spaces (its ROUGE splits on ' ')."""
    for text in texts:
        if not isinstance(text, str):
            raise ValueError(f"{what} must be strings (cleaned reports), got {type(text).__name__}")
    return {i: [" ".join(text.split())] for i, text in enumerate(texts)}


def score_reports(
    references: Sequence[str],
    hypotheses: Sequence[str],
    *,
    meteor: bool = True,
    meteor_timeout_s: float = METEOR_TIMEOUT_S,
) -> dict[str, float | None]:
    """Corpus-level scores of generated reports against one reference each (both cleaned text).

    Returns :data:`METRIC_NAMES` -> score (BLEU and ROUGE-L in [0, 1], CIDEr-D in [0, 10]);
    ``meteor`` is ``None`` when it was not computed (``meteor=False``, no Java, JVM failure).
    """
    return score_systems(references, [hypotheses], meteor=meteor, meteor_timeout_s=meteor_timeout_s)[0]


def score_systems(
    references: Sequence[str],
    systems: Sequence[Sequence[str]],
    *,
    meteor: bool = True,
    meteor_timeout_s: float = METEOR_TIMEOUT_S,
) -> list[dict[str, float | None]]:
    """:func:`score_reports` for several sets of generated reports against the same references, with
    one METEOR JVM for all of them (starting it and loading its paraphrase tables costs ~10 s)."""
    from pycocoevalcap.bleu.bleu import Bleu
    from pycocoevalcap.cider.cider import Cider
    from pycocoevalcap.rouge.rouge import Rouge

    if not references:
        raise ValueError("no reports to score: the evaluation split is empty")
    gts = _normalized(references, "references")
    for hypotheses in systems:
        if len(references) != len(hypotheses):
            raise ValueError(f"{len(references)} references but {len(hypotheses)} generated reports")
    all_res = [_normalized(hypotheses, "generated reports") for hypotheses in systems]
    results = []
    for res in all_res:
        bleu, _ = Bleu(4).compute_score(gts, res, verbose=0)
        rouge, _ = Rouge().compute_score(gts, res)
        cider, _ = Cider().compute_score(gts, res)
        scores: dict[str, float | None] = {f"bleu_{n + 1}": float(b) for n, b in enumerate(bleu)}
        scores.update(meteor=None, rouge_l=float(rouge), cider=float(cider))
        results.append({name: scores[name] for name in METRIC_NAMES})
    if meteor:
        meteors, reason = meteor_scores(gts, all_res, timeout_s=meteor_timeout_s)
        if reason:
            log.warning("METEOR not computed (null in the metrics): %s", reason)
        for scores, value in zip(results, meteors or [None] * len(results)):
            scores["meteor"] = value
    return results


def r2gen_truncated_references(tokenizer, reports: Sequence[str]) -> list[str]:
    """R2Gen's references: each report encoded (truncated to max_length, rare words ``<unk>``) and
    decoded back. Only for comparison with R2Gen's numbers; name the scores ``*_r2gen_truncated``."""
    return [tokenizer.decode(tokenizer.encode(report)) for report in reports]


def meteor_jar() -> str:
    """Path of the METEOR 1.5 jar bundled with pycocoevalcap (its paraphrase data sits beside it)."""
    return str(importlib.resources.files("pycocoevalcap.meteor") / "meteor-1.5.jar")


def meteor_scores(
    gts: dict[int, list[str]], systems: list[dict[int, list[str]]], timeout_s: float = METEOR_TIMEOUT_S
) -> tuple[list[float] | None, str]:
    """(corpus METEOR of each system, '') or (None, why not), every system through one JVM (as
    pycocoevalcap reuses its JVM across calls). pycocoevalcap's stdio protocol, once per system: one
    ``SCORE`` line per item, answered by its statistics, then one ``EVAL`` line over all of them,
    answered by the per-item scores and the corpus score."""
    java = shutil.which("java")
    if java is None:
        return None, "no `java` on PATH (METEOR 1.5 is a Java program; install a JRE, e.g. openjdk-17-jre)"
    jar = meteor_jar()
    if not os.path.isfile(jar):
        return None, f"pycocoevalcap's METEOR jar is missing at {jar}"
    cmd = [java, *_JAVA_LOCALE, "-Xmx2G", "-jar", jar, "-", "-", "-stdio", "-l", "en", "-norm"]
    env = {**os.environ, "LC_ALL": "C.UTF-8", "LANG": "C.UTF-8"}
    with tempfile.TemporaryFile() as stderr:
        proc = subprocess.Popen(
            cmd,
            cwd=os.path.dirname(jar),
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=stderr,
        )
        timer = threading.Timer(timeout_s, proc.kill)
        timer.start()
        try:
            return [_meteor_protocol(proc, gts, res) for res in systems], ""
        except (OSError, ValueError) as error:
            if not timer.is_alive():
                return None, f"the METEOR JVM did not finish within {timeout_s:g} s and was killed"
            proc.kill()
            proc.wait()
            stderr.seek(0)
            detail = stderr.read().decode(errors="replace").strip().splitlines()[-3:]
            return (
                None,
                f"the METEOR JVM failed ({error}); its stderr ends: {' | '.join(detail) or '(empty)'}",
            )
        finally:
            timer.cancel()
            with contextlib.suppress(OSError):  # the JVM may have died: nothing left to flush
                proc.stdin.close()
            proc.kill()
            proc.wait()


def _meteor_protocol(proc: subprocess.Popen, gts: dict[int, list[str]], res: dict[int, list[str]]) -> float:
    def ask(line: str) -> str:
        proc.stdin.write((line + "\n").encode())
        proc.stdin.flush()
        return readline()

    def readline() -> str:
        answer = proc.stdout.readline().decode().strip()
        if not answer:
            raise ValueError("no answer (the JVM exited)")
        return answer

    stats = []
    for key in gts:
        hypothesis = res[key][0].replace("|||", "").replace("  ", " ")
        stats.append(ask(" ||| ".join(("SCORE", " ||| ".join(gts[key]), hypothesis))))
    float(ask("EVAL ||| " + " ||| ".join(stats)))  # the first item's score
    for _ in range(len(stats) - 1):
        float(readline())
    return float(readline())
