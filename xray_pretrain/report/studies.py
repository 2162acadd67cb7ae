"""Reports belong to studies, samples to images: turn sample metadata into report-generation items.

``report.views=1``: one item per image whose study has a report (MIMIC-CXR is scored per image).
``report.views=2``: one item per study, its frontal and its lateral image (R2Gen's IU X-ray setting,
scored per study). Input is each sample's shard json (``key``, ``dataset``, ``study``, ``view``,
``report``: ``{"findings", "impression"}``); nothing here reads images.

Pairing for two views, per (dataset, study), images in key order:
- frontal: a PA image, else AP, else FRONTAL (the first by key); lateral: LATERAL, else LL, RL,
  XTABLE_LATERAL;
- an image without a view fills a missing slot, frontal first, in the order of its json
  ``view_order`` where the source gives one, else by key. IU X-ray shards carry no view (R2Gen's
  annotation does not say which image is which) but do carry ``view_order`` (the image's place in
  the annotation's ``image_path``), so its pairs are ``image_path[0], image_path[1]`` as R2Gen
  feeds them, counted as ``num_pairs_with_unknown_views``;
- a study without a frontal or a lateral image is skipped (``num_missing_view``), other images of a
  paired study are left out (``num_extra_images``).
A study without report text in the chosen section is skipped (``num_no_report``). Every input image
ends up in an item or in exactly one count of :class:`StudyGrouping`.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass

SECTIONS = ("findings", "impression", "both")
# Views as the shard converter normalizes them (data_tools.sources._common.normalize_view); others
# (AP_AXIAL, SWIMMERS, LAO, ...) fill neither slot. In order of preference.
FRONTAL_VIEWS = ("PA", "AP", "FRONTAL")
LATERAL_VIEWS = ("LATERAL", "LL", "RL", "XTABLE_LATERAL")


def report_text(report: Mapping | None, section: str) -> str:
    """The chosen section of a sample's report ('' when absent); ``both`` = findings then impression."""
    if section not in SECTIONS:
        raise ValueError(f"report.section={section!r}: use one of {SECTIONS}")
    if not report:
        return ""
    parts = ("findings", "impression") if section == "both" else (section,)
    return " ".join(" ".join(str(report.get(part) or "").split()) for part in parts).strip()


@dataclass(frozen=True)
class ReportItem:
    """One generation target: its images (frontal first for two views) and its report text."""

    dataset: str
    study: str
    keys: tuple[str, ...]
    report: str


@dataclass
class StudyGrouping:
    items: list[ReportItem]
    num_images: int = 0
    num_no_report: int = 0  # images of studies with no text in the chosen section
    num_missing_view: int = 0  # images of studies without both a frontal and a lateral image
    num_extra_images: int = 0  # further images of studies already paired
    num_pairs_with_unknown_views: int = 0  # pairs where at least one slot was filled by a view-less image
    num_report_conflicts: int = 0  # studies whose images disagree on the report (the first key's kept)

    def summary(self) -> str:
        return (
            f"{len(self.items)} report items from {self.num_images} images; images left out: "
            f"{self.num_no_report} without report, {self.num_missing_view} without a frontal+lateral pair, "
            f"{self.num_extra_images} extra views; {self.num_pairs_with_unknown_views} pairs used images "
            f"without a view; {self.num_report_conflicts} studies with conflicting reports"
        )


def _study_of(sample: Mapping) -> tuple[str, str]:
    # A dataset without study ids: every image is its own study.
    return str(sample["dataset"]), str(sample.get("study") or f"image:{sample['key']}")


def group_studies(samples: Iterable[Mapping], views: int, section: str) -> StudyGrouping:
    """Report items for ``views`` (1 or 2) from sample metadata, sorted by (dataset, study, key)."""
    if views not in (1, 2):
        raise ValueError(f"report.views={views}: use 1 (one image) or 2 (frontal + lateral)")
    studies: dict[tuple[str, str], list[Mapping]] = {}
    for sample in samples:
        studies.setdefault(_study_of(sample), []).append(sample)
    out = StudyGrouping(items=[])
    for (dataset, study), images in sorted(studies.items()):
        images = sorted(images, key=lambda s: s["key"])
        out.num_images += len(images)
        texts = [report_text(s.get("report"), section) for s in images]
        text = next((t for t in texts if t), "")
        out.num_report_conflicts += len({t for t in texts if t}) > 1
        if not text:
            out.num_no_report += len(images)
            continue
        if views == 1:
            out.items.extend(ReportItem(dataset, study, (s["key"],), text) for s in images)
            continue
        pair, used_unknown = _frontal_lateral(images)
        if pair is None:
            out.num_missing_view += len(images)
            continue
        out.items.append(ReportItem(dataset, study, pair, text))
        out.num_extra_images += len(images) - 2
        out.num_pairs_with_unknown_views += used_unknown
    return out


def _frontal_lateral(images: list[Mapping]) -> tuple[tuple[str, str] | None, bool]:
    """((frontal key, lateral key), whether a view-less image filled a slot), or (None, False)."""
    frontal = _preferred(images, FRONTAL_VIEWS)
    lateral = _preferred(images, LATERAL_VIEWS)
    # View-less images fill the slots in the source's own order where it has one (IU X-ray's
    # image_path: R2Gen feeds [0] then [1]), else by key.
    viewless = [s for s in images if not s.get("view")]
    unknown = [
        s["key"]
        for s in sorted(
            viewless, key=lambda s: (s.get("view_order") is None, s.get("view_order") or 0, s["key"])
        )
    ]
    used_unknown = False
    if not frontal and unknown:
        frontal, used_unknown = [unknown.pop(0)], True
    if not lateral and unknown:
        lateral, used_unknown = [unknown.pop(0)], True
    if not frontal or not lateral:
        return None, False
    return (frontal[0], lateral[0]), used_unknown


def _preferred(images: list[Mapping], views: tuple[str, ...]) -> list[str]:
    """Keys of the images with one of ``views``, by the view's rank then key."""
    ranked = [(views.index(s["view"]), s["key"]) for s in images if s.get("view") in views]
    return [k for _, k in sorted(ranked)]
