"""Study grouping for report generation: IU X-ray-like studies (two view-less images, R2Gen's
annotation) and MIMIC-like studies (PA / AP / LATERAL, several images, missing reports)."""

from __future__ import annotations

import hashlib

import pytest

from xray_pretrain.report.studies import group_studies, report_text


def key(name: str) -> str:
    return hashlib.sha256(name.encode()).hexdigest()[:16]


def iu_like() -> list[dict]:
    """As the iu-xray source writes R2Gen's annotation: the report in findings, no view."""
    studies = {
        "CXR2384_IM-0942": "The heart size and pulmonary vascularity appear within normal limits.",
        "CXR2926_IM-1328": "Cardiac and mediastinal contours are within normal limits. The lungs are clear.",
        "CXR9999_IM-0000": "",  # an entry with an empty report
    }
    return [
        {"key": key(f"{s}/{i}.png"), "dataset": "iu-xray", "study": key(s), "view": None,
         "report": {"findings": text, "impression": ""}}
        for s, text in studies.items() for i in (0, 1)
    ]  # fmt: skip


def mimic_like() -> list[dict]:
    report = {"findings": "Lungs are clear.", "impression": "No acute process."}
    rows = [
        ("s1", "a", "PA", report), ("s1", "b", "LATERAL", report), ("s1", "c", "AP", report),  # one extra
        ("s2", "d", "AP", report),  # no lateral
        ("s3", "e", "LL", report), ("s3", "f", None, report),  # the view-less one becomes the frontal
        ("s4", "g", "PA", None), ("s4", "h", "LATERAL", None),  # no report
        ("s5", "i", "PA", {"findings": "", "impression": "Stable."}),  # impression only
        ("s5", "j", "LATERAL", {"findings": "", "impression": "Stable."}),
    ]  # fmt: skip
    return [
        {"key": key(k), "dataset": "mimic-cxr", "study": key(s), "view": v, "report": r}
        for s, k, v, r in rows
    ]


def test_iu_two_views_pairs_each_study_and_skips_the_empty_report():
    samples = iu_like()
    grouping = group_studies(samples, views=2, section="findings")
    by_study = {item.study: item for item in grouping.items}
    assert set(by_study) == {key("CXR2384_IM-0942"), key("CXR2926_IM-1328")}
    item = by_study[key("CXR2926_IM-1328")]
    assert set(item.keys) == {key("CXR2926_IM-1328/0.png"), key("CXR2926_IM-1328/1.png")}
    assert item.report.startswith("Cardiac and mediastinal")
    assert grouping.num_no_report == 2 and grouping.num_pairs_with_unknown_views == 2
    assert grouping.num_images == 6 == 2 * len(grouping.items) + grouping.num_no_report


def test_mimic_two_views_pairs_frontal_with_lateral():
    grouping = group_studies(mimic_like(), views=2, section="findings")
    pairs = {item.keys for item in grouping.items}
    assert pairs == {(key("a"), key("b")), (key("f"), key("e"))}  # s1: PA + LATERAL; s3: view-less + LL
    assert grouping.num_extra_images == 1  # s1's AP
    assert grouping.num_missing_view == 1  # s2
    assert grouping.num_no_report == 4  # s4 (no report), s5 (no findings)
    accounted = 2 * len(grouping.items) + grouping.num_extra_images + grouping.num_missing_view
    assert accounted + grouping.num_no_report == grouping.num_images == 10
    assert "2 report items from 10 images" in grouping.summary()


def test_one_view_gives_every_image_with_a_report():
    grouping = group_studies(mimic_like(), views=1, section="both")
    assert len(grouping.items) == 8 and grouping.num_no_report == 2  # s4's two images
    s5 = [item for item in grouping.items if item.study == key("s5")]
    assert [item.report for item in s5] == ["Stable.", "Stable."]
    s1 = next(item for item in grouping.items if item.study == key("s1"))
    assert s1.report == "Lungs are clear. No acute process."


def test_sections_and_bad_options():
    assert report_text({"findings": " a\nb ", "impression": "c"}, "both") == "a b c"
    assert report_text(None, "impression") == ""
    with pytest.raises(ValueError, match="report.section='summary'"):
        report_text({}, "summary")
    with pytest.raises(ValueError, match="report.views=3"):
        group_studies([], views=3, section="findings")
