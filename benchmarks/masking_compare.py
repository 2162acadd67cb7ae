"""Masking compared: pre-train the demo's tiny MAE with `random`, `context` and `rectangle` masking on
the same phantoms (same steps, batch and seed), fine-tune each the same way with a recipe of the
demo's classification stage (`xray_pretrain.demo_classify.RECIPES`, `--recipe`; `partial`, the one
benchmarks/RESULTS.md measured, by default), and write one table: mean AUROC over the
phantom findings at label fractions 1%, 10% and 100%, per seed, with 95% bootstrap intervals, next
to random init (the runs' common step-0 weights) and a logistic regression on pixels.

    nice -n 10 env OMP_NUM_THREADS=1 python benchmarks/masking_compare.py --work /tmp/masking \\
        [--num-images 9000] [--size 128] [--steps 600] [--recipe partial] [--results benchmarks/RESULTS.md]

Stages (each skipped when its output exists, so an interrupted run continues): synth + convert
(`xray-shard`, png16, long side 128), a count of each class's positives in every seed's training
subset (the run stops there, before pre-training, when one has fewer than `--min-positives` at 1%:
issue 8 asks for >= 15), one plain pre-training process per strategy (`xray-pretrain
pretrain --config tiny_cpu`, norm_pix_loss as the demo's recipe), then every classifier in this
process. `random` masks 75% (MAE); `context` and `rectangle` mask 90% overall, 95% inside the
chest region and 85% outside (the paper's setting), so they cost fewer FLOPs per step: the table
reports them (analytic, `estimate_step_flops`). The test set is the phantom folder's own test split
(patients disjoint from train and val). With `--results`, the section between the markers
`<!-- masking_compare -->` and `<!-- /masking_compare -->` of that file is replaced.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

STRATEGIES = {  # strategy -> mask overrides
    "random": ["mask.strategy=random", "mask.ratio=0.75"],
    "context": [
        "mask.strategy=context",
        "mask.ratio=0.9",
        "mask.ratio_inside=0.95",
        "mask.ratio_outside=0.85",
    ],
    "rectangle": [
        "mask.strategy=rectangle",
        "mask.ratio=0.9",
        "mask.ratio_inside=0.95",
        "mask.ratio_outside=0.85",
    ],
}
FRACTIONS = (0.01, 0.1, 1.0)
SEEDS = (0, 1, 2)
MARKERS = ("<!-- masking_compare -->", "<!-- /masking_compare -->")


def run(cmd: list[str], log: Path) -> None:
    print("$ " + " ".join(cmd), flush=True)
    env = dict(os.environ, OMP_NUM_THREADS=os.environ.get("OMP_NUM_THREADS", "1"))
    with open(log, "w") as out:
        if subprocess.run(cmd, stdout=out, stderr=subprocess.STDOUT, env=env).returncode != 0:
            sys.exit(f"failed: {' '.join(cmd)} (log: {log})")


def make_data(work: Path, num_images: int, size: int) -> Path:
    bin_dir = Path(sys.executable).parent
    phantoms, shards = work / "phantoms", work / "shards"
    if not (phantoms / "labels.csv").is_file():
        run([str(bin_dir / "xray-shard"), "synth", "--out", str(phantoms), "--num", str(num_images), "--size",
             str(size), "--seed", "10", "--workers", "2", "--no-progress"], work / "synth.log")  # fmt: skip
    if not (shards / "manifest.json").is_file():
        run([str(bin_dir / "xray-shard"), "convert", "--source", "csv", "--input", str(phantoms), "--out",
             str(shards), "--dataset", "phantom", "--format", "png16", "--long-side", "128", "--salt",
             "xray-pretrain-demo-phantoms", "--no-progress"], work / "convert.log")  # fmt: skip
    return shards


def pretrain(work: Path, shards: Path, strategy: str, steps: int, recipe_overrides: list[str]) -> Path:
    out = work / f"run_{strategy}"
    if (out / "train_summary.json").is_file():
        return out
    overrides = [*recipe_overrides, *STRATEGIES[strategy], f"data.shards=[{shards}]", f"log.out_dir={out}",
                 f"train.steps={steps}", "train.seed=0", "log.progress=false", "checkpoint.every=100000",
                 "log.val_every=100000", "log.image_every=100000"]  # fmt: skip
    xray_pretrain = str(Path(sys.executable).parent / "xray-pretrain")
    out.mkdir(parents=True, exist_ok=True)
    start = time.perf_counter()
    run([xray_pretrain, "pretrain", "--config", "tiny_cpu", *overrides], work / f"pretrain_{strategy}.log")
    (out / "wall_s.txt").write_text(f"{time.perf_counter() - start:.1f}\n")
    return out


def step_flops(strategy: str, recipe_overrides: list[str]) -> float:
    from xray_pretrain.config import load_config
    from xray_pretrain.models import estimate_step_flops

    cfg = load_config("tiny_cpu", ["data.shards=[x]", *recipe_overrides, *STRATEGIES[strategy]])
    return estimate_step_flops(cfg.model, cfg.mask, cfg.train.global_batch)["total"]


def count_positives(shards: Path, recipe_overrides: list[str], fractions) -> dict[float, list[int]]:
    """Per label fraction, the fewest positives per class over the seeds' training subsets (the
    subsets `Comparison.train_subset` draws), counted before any pre-training."""
    from xray_pretrain.config import load_config
    from xray_pretrain.demo_classify import DEFAULT_RECIPE, classify_task, load_split, train_rows

    cfg = load_config("tiny_cpu", [f"data.shards=[{shards}]", *recipe_overrides])
    train = load_split([shards], ["train"], cfg.model.image_hw())
    train.set_targets(classify_task(cfg, DEFAULT_RECIPE, 0, train.label_names))
    targets = train.targets_NC.numpy()
    subsets = {
        (f, s): train_rows([shards], train.label_names, f, s, train.keys) for f in fractions for s in SEEDS
    }
    return {
        f: [int(min((targets[subsets[f, s], c] == 1).sum() for s in SEEDS)) for c in range(targets.shape[1])]
        for f in fractions
    }


def compare_all(
    shards: Path, runs: dict[str, Path], fractions, num_resamples: int, recipe_name: str, positives: dict
) -> dict:
    import torch

    from xray_pretrain.demo_classify import RECIPES, Comparison
    from xray_pretrain.engine.init_weights import open_source, step0_source
    from xray_pretrain.tasks.metrics import bootstrap_interval

    bench = Comparison(runs["random"], shards, shards, test_splits=("test",))
    step0 = {name: step0_source(run_dir) for name, run_dir in runs.items()}
    first = next(iter(step0.values())).state
    assert all(all(torch.equal(first[k], s.state[k]) for k in first) for s in step0.values()), (
        "the runs' step-0 weights differ: random init would not be shared"
    )
    sources = {name: open_source(run_dir) for name, run_dir in runs.items()}
    sources["random init"] = step0["random"]
    targets = bench.targets()
    results: dict = {"num_train": len(bench.data["train"].keys), "num_val": len(bench.data["val"].keys),
                     "num_test": bench.num_test, "rows": {}, "min_positives": {}}  # fmt: skip
    for fraction in fractions:
        results["min_positives"][fraction] = positives[fraction]
        recipe = replace(RECIPES[recipe_name], label_fraction=fraction)
        rows = {name: bench.row(source, recipe, SEEDS) for name, source in sources.items()}
        rows["pixels"] = bench.pixel_row(fraction, SEEDS)
        for name, row in rows.items():
            low, high = bootstrap_interval(row.probs_SNC, targets, num_resamples=num_resamples)
            gap = None
            if name not in ("random init", "pixels"):
                gap = bootstrap_interval(row.probs_SNC, targets, rows["random init"].probs_SNC,
                                         num_resamples=num_resamples)  # fmt: skip
            results["rows"].setdefault(name, {})[fraction] = {
                "mean_auroc": float(np.mean(row.test_mean_auroc)),
                "seeds": row.test_mean_auroc,
                "ci95": [low, high],
                "gap_ci95": gap,
                "chosen": row.chosen,
            }
            print(f"{name:12s} lf {fraction:<5} mean AUROC {np.mean(row.test_mean_auroc):.3f} "
                  f"[{low:.3f}, {high:.3f}]", flush=True)  # fmt: skip
    return results


def table(
    results: dict, fractions: list[float], flops: dict[str, float], pretrain_s: dict[str, float], args
) -> str:
    head = "| encoder | pre-training FLOPs per step | " + " | ".join(f"lf {f:g}" for f in fractions) + " |"
    lines = [head, "|" + "---|" * (2 + len(fractions))]
    for name, cells in results["rows"].items():
        cost = f"{flops[name] / 1e9:.1f} GFLOP ({pretrain_s[name]:.0f} s wall)" if name in flops else ""
        values = []
        for f in fractions:
            c = cells[f]
            seeds = " ".join(f"{v:.3f}" for v in c["seeds"])
            text = f"**{c['mean_auroc']:.3f}** [{seeds}] ({c['ci95'][0]:.3f}–{c['ci95'][1]:.3f})"
            if c["gap_ci95"] is not None:
                rand = results["rows"]["random init"][f]["mean_auroc"]
                text += (
                    f"; gap {c['mean_auroc'] - rand:+.3f} ({c['gap_ci95'][0]:+.3f}…{c['gap_ci95'][1]:+.3f})"
                )
            values.append(text)
        lines.append(f"| {name} | {cost} | " + " | ".join(values) + " |")
    positives = "; ".join(f"lf {f:g}: {min(p)}" for f, p in results["min_positives"].items())
    return "\n".join([
        f"Phantoms: `synth --num {args.num_images} --size {args.size} --seed 10`, png16 long side 128: train "
        f"{results['num_train']} / val {results['num_val']} / test {results['num_test']} images; fewest "
        f"positives of a class in a seed's training subset: {positives}. Pre-training: `tiny_cpu`, "
        f"{args.steps} steps at batch 32, seed 0, one process. Cell: mean AUROC over the 5 findings on "
        "the test split, mean of seeds 0-2 [per seed] (95% bootstrap interval over test images); for "
        "pre-trained rows the gap to random init (paired 95% interval).",
        "",
        *lines,
    ])  # fmt: skip


def merge(work: Path) -> dict:
    """The results of every `--fractions` process, in one dict (rows -> fraction -> cell)."""
    merged: dict = {"rows": {}, "min_positives": {}}
    for path in sorted(work.glob("results_lf*.json")):
        part = json.loads(path.read_text())
        for key in ("num_train", "num_val", "num_test"):
            merged[key] = part[key]
        merged["min_positives"].update({float(f): v for f, v in part["min_positives"].items()})
        for name, cells in part["rows"].items():
            merged["rows"].setdefault(name, {}).update({float(f): c for f, c in cells.items()})
    return merged


def main() -> None:
    from xray_pretrain.demo_classify import RECIPES

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--work", type=Path, required=True)
    p.add_argument("--num-images", type=int, default=9000)
    p.add_argument("--size", type=int, default=128)
    p.add_argument("--steps", type=int, default=600)
    p.add_argument("--num-resamples", type=int, default=1000)
    p.add_argument(
        "--min-positives", type=int, default=15,
        help="stop before pre-training when a class has fewer positives in a seed's 1%% subset",
    )  # fmt: skip
    p.add_argument(
        "--recipe", default="partial", choices=list(RECIPES), help="partial: as RESULTS.md measured"
    )
    p.add_argument(
        "--fractions", type=float, nargs="*", default=list(FRACTIONS),
        help="label fractions this process fine-tunes (none: only write the table); processes given "
        "different fractions can run at once: each writes WORK/results_lf{F}.json, the table merges them",
    )  # fmt: skip
    p.add_argument("--results", type=Path, help="markdown file whose masking_compare section is replaced")
    args = p.parse_args()
    import torch

    torch.set_num_threads(1)
    args.work.mkdir(parents=True, exist_ok=True)
    recipe_overrides = list(RECIPES[args.recipe].pretrain_overrides)
    shards = make_data(args.work, args.num_images, args.size)
    positives = count_positives(shards, recipe_overrides, FRACTIONS)
    print("fewest positives of a class in a seed's training subset: "
          + "; ".join(f"lf {f:g}: {min(p)} {p}" for f, p in positives.items()), flush=True)  # fmt: skip
    if min(positives[min(FRACTIONS)]) < args.min_positives:
        sys.exit(f"at lf {min(FRACTIONS):g} a class has only {min(positives[min(FRACTIONS)])} positives in a "
                 f"seed's subset (< --min-positives {args.min_positives}): raise --num-images")  # fmt: skip
    runs = {s: pretrain(args.work, shards, s, args.steps, recipe_overrides) for s in STRATEGIES}
    flops = {s: step_flops(s, recipe_overrides) for s in STRATEGIES}
    pretrain_s = {s: float((runs[s] / "wall_s.txt").read_text()) for s in STRATEGIES}
    if args.fractions:
        start = time.perf_counter()
        part = compare_all(shards, runs, args.fractions, args.num_resamples, args.recipe, positives)
        part["classify_wall_s"] = time.perf_counter() - start
        name = "_".join(f"{f:g}" for f in args.fractions)
        (args.work / f"results_lf{name}.json").write_text(json.dumps(part, indent=2, default=str))
    results = merge(args.work)
    if not results["rows"]:
        print(f"no {args.work}/results_lf*.json yet: run with --fractions to fine-tune")
        return
    fractions = [f for f in FRACTIONS if all(f in cells for cells in results["rows"].values())]
    text = table(results, fractions, flops, pretrain_s, args)
    print(text)
    if args.results:
        doc = args.results.read_text()
        start_at, end_at = doc.index(MARKERS[0]) + len(MARKERS[0]), doc.index(MARKERS[1])
        args.results.write_text(doc[:start_at] + "\n" + text + "\n" + doc[end_at:])


if __name__ == "__main__":
    main()
