"""The chest-region estimate on real radiographs with ground-truth lung boxes (../shared/cxr-corpus:
the covid lung boxes plus the boxes drawn for this project in tests/data/lung_boxes_drawn.csv), and
its fallback to the seed paper's rectangle on images it cannot read. Skipped where the corpus is absent."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

from data_tools.roi_eval import load_ground_truth, score, stored_image, summary
from xray_core.roi import SEED_RECTANGLE, estimate_chest_region_detail

CORPUS = Path(__file__).resolve().parents[2] / "shared" / "cxr-corpus"
DRAWN = Path(__file__).resolve().parent / "data" / "lung_boxes_drawn.csv"
needs_corpus = pytest.mark.skipif(
    not (CORPUS / "covid-lung-boxes").is_dir(), reason=f"real chest X-ray corpus not found at {CORPUS}"
)


@pytest.fixture(scope="module")
def scored():
    return score(CORPUS, load_ground_truth(CORPUS, DRAWN))


@needs_corpus
def test_ground_truth_is_complete_and_split():
    truths = load_ground_truth(CORPUS, DRAWN)
    assert len(truths) == 42 and len({t.path for t in truths}) == 42  # 14 covid + 28 drawn, no duplicates
    assert sum(t.half == "heldout" for t in truths) == 14
    assert all(0 <= t.box[0] < t.box[2] <= 1 and 0 <= t.box[1] < t.box[3] <= 1 for t in truths)


@needs_corpus
def test_lung_box_iou_on_real_radiographs(scored):
    # Measured (benchmarks/RESULTS.md): 41 of 42 at IoU >= 0.7 (tune 28/28, held out 13/14), median
    # 0.84. The bar is the issue's: at least 90% of the images at IoU >= 0.7.
    result = summary(scored)
    assert result["share_at_threshold"] >= 0.9, result["misses"]
    assert result["median_iou"] >= 0.8
    assert all(s.region.method == "fitted" for s in scored)  # every real chest gets its own box


@needs_corpus
@pytest.mark.parametrize(
    "path",
    [
        "highdicom/thorax_canine/dx_image.dcm",  # a dog
        "pydicom-data/non_chest_negative/RG3_J2KI.dcm",  # a tibia
        "torchxrayvision/tests/Fake_MONOHR1.dcm",  # a chest shown inverted (mislabelled header)
    ],
)
def test_images_unlike_a_chest_get_the_seed_rectangle(path):
    region = estimate_chest_region_detail(stored_image(CORPUS / path))
    assert region.method == "rectangle" and region.reason in ("not_chest", "unsure")
    assert region.box == [round(v, 4) for v in SEED_RECTANGLE]
    assert region.confidence < 0.6


def test_lateral_view_gets_the_seed_rectangle_and_noise_is_unsure():
    rng = np.random.default_rng(0)
    lateral = estimate_chest_region_detail(rng.random((200, 160)), view="LL")
    assert (lateral.method, lateral.reason) == ("rectangle", "lateral")
    noise = estimate_chest_region_detail(rng.random((200, 160)))
    assert noise.method == "rectangle" and noise.confidence < 0.6
    mask = noise.mask_hw > 0
    rows, cols = np.flatnonzero(mask.any(axis=1)), np.flatnonzero(mask.any(axis=0))
    assert (rows[0], rows[-1] + 1, cols[0], cols[-1] + 1) == (38, 102, 15, 82)  # the rectangle at 128x102


def test_convert_gives_lateral_views_the_seed_rectangle(tmp_path):
    import csv
    import json

    from data_tools.convert import convert
    from data_tools.synth import synthesize
    from xray_core.shardio import read_idx, read_sample

    synthesize(tmp_path / "dicom", num_images=3, size=64, seed=1, progress=False)
    table = tmp_path / "dicom" / "labels.csv"
    rows = list(csv.DictReader(open(table, newline="")))
    rows[0]["view"] = "Lateral"  # the view column decides, whatever the pixels look like
    with open(table, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=list(rows[0]))
        writer.writeheader()
        writer.writerows(rows)
    convert(tmp_path / "dicom", tmp_path / "shards", long_side=64, num_workers=1, progress=False, salt="t")
    metas = []
    for tar in sorted((tmp_path / "shards").glob("*.tar")):
        with open(tar, "rb") as f:
            metas += [json.loads(read_sample(f, s)["json"]) for s in read_idx(tar.with_suffix(".idx"))]
    lateral = [m for m in metas if m["view"] == "LATERAL"]
    assert len(metas) == 3 and len(lateral) == 1
    assert lateral[0]["roi_method"] == "rectangle" and "roi_lateral" in lateral[0]["flags"]
    assert lateral[0]["roi_box"] == [round(v, 4) for v in SEED_RECTANGLE]
    assert all(m["roi_method"] == "fitted" for m in metas if m["view"] != "LATERAL")


def test_conversion_rectangle_is_the_one_rectangle_masking_uses():
    from xray_pretrain.models.masking import SEED_GRID, SEED_RECT_COLS, SEED_RECT_ROWS

    rows = [v / SEED_GRID for v in SEED_RECT_ROWS]
    cols = [v / SEED_GRID for v in SEED_RECT_COLS]
    assert list(SEED_RECTANGLE) == [rows[0], cols[0], rows[1], cols[1]]
