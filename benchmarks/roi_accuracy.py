"""Chest-region estimate vs ground-truth lung boxes on the real radiographs of ../shared/cxr-corpus.

    python benchmarks/roi_accuracy.py [--corpus ../shared/cxr-corpus] [--out benchmarks/roi_worst.png]

Prints, per half (tune: the boxes the atlas was learned from; heldout: never used while tuning), N,
the IoU distribution (min, quartiles, max), the share with IoU >= 0.7 and the misses; the CPU time
of the estimate per 1280-px image (small copy + atlas fit, `time.process_time`, as `xray-shard
convert` counts it); and the confidence / method on the corpus's non-chest and corrupt images.
Writes a contact sheet of the worst cases (ground truth green, estimate red).
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import numpy as np

from data_tools.roi_eval import contact_sheet, load_ground_truth, score, stored_image, summary
from xray_core.roi import estimate_chest_region_detail, small_copy

REPO = Path(__file__).resolve().parents[1]
NEGATIVES = [
    "highdicom/thorax_canine/dx_image.dcm",
    "pydicom-data/non_chest_negative/RG3_J2KI.dcm",
    "pseudo-phi-jsl/non_chest_negative/CT_localizer_toshiba_6774825273.dcm",
    "torchxrayvision/tests/Fake_MONOHR1.dcm",
    "pseudo-phi-jsl/corrupt_pixeldata_negative/CR_fuji_292821506.dcm",
    "pseudo-phi-jsl/corrupt_pixeldata_negative/DX_ge_339833062_img3_derived_secondary.dcm",
    "pseudo-phi-jsl/corrupt_pixeldata_negative/DX_philips_7361647728_AP.dcm",
    "nih-chestx-taheeraahmed/00000032_015.png",
]
NUM_TIMING_REPEATS = 3


def _cpu_milliseconds(image: np.ndarray) -> float:
    """Least CPU time of a few runs (the machine may be shared: the least is the estimate's own cost)."""
    times = []
    for _ in range(NUM_TIMING_REPEATS):
        start = time.process_time()
        estimate_chest_region_detail(image, small_copy(image))
        times.append(1000 * (time.process_time() - start))
    return min(times)


def _report(name: str, scored) -> None:
    result = summary(scored)
    ious = np.array([s.iou for s in scored])
    quartiles = " ".join(f"{q:.2f}" for q in np.percentile(ious, [0, 25, 50, 75, 100]))
    num_hits = round(result["share_at_threshold"] * result["num"])
    print(f"{name}: N={result['num']}  IoU min/q1/median/q3/max {quartiles}  ", end="")
    print(f"IoU>=0.7: {num_hits}/{result['num']} ({100 * result['share_at_threshold']:.1f}%)")
    for path, iou, method in result["misses"]:
        print(f"  miss: {path}  IoU {iou}  ({method})")


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpus", type=Path, default=REPO.parent / "shared" / "cxr-corpus")
    parser.add_argument("--boxes", type=Path, default=REPO / "tests" / "data" / "lung_boxes_drawn.csv")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "roi_worst.png")
    parser.add_argument("--num-worst", type=int, default=12)
    args = parser.parse_args()
    if not (args.corpus / "covid-lung-boxes").is_dir():
        parser.error(f"{args.corpus} has no covid-lung-boxes/: pass --corpus (the real chest X-ray corpus)")
    scored = score(args.corpus, load_ground_truth(args.corpus, args.boxes))
    for half in ("tune", "heldout"):
        _report(half, [s for s in scored if s.truth.half == half])
    _report("all", scored)
    times = [_cpu_milliseconds(s.image_hw) for s in scored]
    print(f"CPU ms per image (1280 px): median {np.median(times):.1f}, max {max(times):.1f}")
    print("non-chest / corrupt / unreadable images:")
    for path in NEGATIVES:
        region = estimate_chest_region_detail(stored_image(args.corpus / path))
        print(f"  {path}: {region.method} ({region.reason or 'box'}), confidence {region.confidence:.2f}")
    worst = sorted(scored, key=lambda s: s.iou)[: args.num_worst]
    print(f"wrote {contact_sheet(worst, args.out)}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
