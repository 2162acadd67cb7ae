"""`xray-pretrain demo`: the whole system on the CPU in minutes.

phantom DICOMs (`xray-shard synth`) -> shards (`xray-shard convert`) -> 2-rank ZeRO-2 MAE pre-training
under the `deepspeed` launcher (CPU ranks on gloo) -> export as a timm model folder (loaded back with
timm alone) -> classifiers on the phantom findings, pre-trained vs random init, scored on held-out
phantoms of a second synth seed (`xray_pretrain.demo_classify`) -> a report generator fine-tuned from
the pre-training run on the phantoms' templated findings, scored against the most-common-report
baseline and on other studies' images -> `summary.json`.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

DEFAULT_CONFIG = "tiny_cpu"  # a packaged config (xray_pretrain/configs/), found from any folder
# Phantoms hold no real patients, so a fixed, public salt is fine here (real data: --salt SECRET).
DEMO_SALT = "xray-pretrain-demo-phantoms"


def add_arguments(p) -> None:
    p.add_argument("--out", type=Path, default=Path("runs/demo"), help="everything goes under this folder")
    p.add_argument("--config", default=DEFAULT_CONFIG, help="config file or packaged config name")
    p.add_argument("--num-images", type=int, default=480, help="phantom radiographs to synthesize")
    p.add_argument(
        "--num-test-images", type=int, default=520,
        help="held-out phantoms (a second synth seed) that score the classifiers, every split of them",
    )  # fmt: skip
    # 192 px, not 256: synthesizing and converting the 480 + 520 phantoms must stay under 45 s on two
    # cores (measured CPU per phantom: synth 53 ms at 256 px, 40 ms at 192; convert 28 ms either way).
    p.add_argument("--size", type=int, default=192, help="phantom size in pixels")
    p.add_argument("--long-side", type=int, default=128, help="stored shard image long side")
    p.add_argument("--ranks", type=int, default=2, help="CPU ranks spawned by the deepspeed launcher")
    p.add_argument("--zero-stage", type=int, default=2, choices=[1, 2, 3])
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("overrides", nargs="*", metavar="section.key=value", help="extra run-config overrides")


def _step(title: str) -> float:
    print(f"\n== {title}", flush=True)
    return time.perf_counter()


def run(args) -> int:
    from data_tools.convert import convert
    from data_tools.synth import synthesize
    from xray_pretrain.config import load_config
    from xray_pretrain.demo_classify import DEFAULT_RECIPE, compare
    from xray_pretrain.demo_report import report_stage
    from xray_pretrain.engine.export import export_encoder
    from xray_pretrain.engine.launch import launch_training

    out = _fresh_folder(args.out.resolve())
    phantoms, shards, run_dir, export_dir = out / "phantoms", out / "shards", out / "run", out / "export"
    test_phantoms, test_shards = out / "test_phantoms", out / "test_shards"
    recipe = DEFAULT_RECIPE
    overrides = [
        *recipe.pretrain_overrides,  # the pre-training the classification recipe was measured with
        f"data.shards=[{shards}]",
        f"log.out_dir={run_dir}",
        f"train.zero_stage={args.zero_stage}",
        f"train.seed={args.seed}",
        *args.overrides,
    ]
    load_config(args.config, overrides)  # validate before any work starts
    times = {}

    workers = os.cpu_count() or 1
    t = _step(f"1/6 synthesize {args.num_images} + {args.num_test_images} held-out phantom DICOMs -> {out}")
    synthesize(phantoms, num_images=args.num_images, size=args.size, seed=args.seed, num_workers=workers)
    synthesize(test_phantoms, args.num_test_images, size=args.size, seed=args.seed + 1, num_workers=workers)
    times["synth_s"] = time.perf_counter() - t

    t = _step(f"2/6 convert to WebDataset shards -> {shards}, {test_shards}")
    options = dict(
        source="csv", dataset="phantom", image_format="png16", long_side=args.long_side, salt=DEMO_SALT
    )
    manifest = convert(phantoms, shards, **options)
    convert(test_phantoms, test_shards, **options)
    times["convert_s"] = time.perf_counter() - t

    t = _step(f"3/6 pre-train the MAE on {args.ranks} CPU ranks, ZeRO-{args.zero_stage} -> {run_dir}")
    run_dir.mkdir(parents=True)
    launch_training(args.config, overrides, args.ranks, out / "train.log")
    times["train_s"] = time.perf_counter() - t
    train_summary = json.loads((run_dir / "train_summary.json").read_text())

    t = _step(f"4/6 export the encoder -> {export_dir}")
    export_config = export_encoder(run_dir / "checkpoints", export_dir)
    export_config["load"] = _timm_load(export_dir)
    times["export_s"] = time.perf_counter() - t

    t = _step(f"5/6 classifiers on the findings, pre-trained vs random init, tested on {test_shards}")
    classify = compare(run_dir, shards, test_shards, recipe)
    (out / "classify.json").write_text(json.dumps(classify, indent=2))
    times["classify_s"] = time.perf_counter() - t

    t = _step(
        f"6/6 report generator fine-tuned from the pre-training run -> {out / 'report'}, tested on {test_shards}"
    )
    report = report_stage(run_dir, shards, test_shards, out / "report", args.ranks, args.seed)
    times["report_s"] = time.perf_counter() - t

    summary = _summary(train_summary, manifest, export_config, shards, export_dir, times)
    summary["classify"] = classify["classify"]
    summary["report"] = report
    (out / "summary.json").write_text(json.dumps(summary, indent=2))
    _print_where(summary, out)
    return 0


def _timm_load(export_dir: Path) -> str:
    """The one line that loads the export with timm alone; run here once so the demo proves it."""
    import timm

    line = f'timm.create_model("local-dir:{export_dir}", pretrained=True)'
    model = timm.create_model(f"local-dir:{export_dir}", pretrained=True)
    print(f"  {line} -> {type(model).__name__}, {model.num_features} features per image", flush=True)
    return line


def _fresh_folder(out: Path) -> Path:
    if out.exists() and any(out.iterdir()):
        print(f"{out} exists: removing the previous demo run", flush=True)
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    return out


def _summary(
    train: dict, manifest: dict, export_config: dict, shards: Path, export_dir: Path, times: dict
) -> dict:
    return {
        "first_train_loss": train["first_loss"],
        "last_train_loss": train["last_loss"],
        "val_loss": train["val_loss"],
        "val_loss_baseline": train["val_loss_baseline"],
        "val_ratio": train["val_loss"] / train["val_loss_baseline"],
        "steps": train["steps"],
        "world_size": train["world_size"],
        "num_samples": manifest["num_samples"],
        "num_skipped": manifest["num_skipped"],
        "shards_dir": str(shards),
        "checkpoint_dir": train["checkpoint_dir"],
        "export_dir": str(export_dir),
        "encoder_params": export_config["num_params"],
        "export_load": export_config["load"],
        "tensorboard_dir": train["tensorboard_dir"],
        "reconstruction_image": train["reconstruction_image"],
        "seconds": {k: round(v, 1) for k, v in times.items()},
    }


def _print_where(summary: dict, out: Path) -> None:
    from xray_pretrain.demo_report import fmt_score

    print("\n== done")
    shown = (
        "val_loss",
        "val_loss_baseline",
        "val_ratio",
        "checkpoint_dir",
        "export_dir",
        "export_load",
        "tensorboard_dir",
        "reconstruction_image",
    )
    for key in shown:
        print(f"  {key:22s} {summary[key]}")
    report = summary["report"]
    print(f"  {'report cider':22s} {fmt_score(report['cider'])} (most common report {fmt_score(report['baseline']['cider'])}, "
          f"other studies' images {fmt_score(report['shuffled_cider'])})")  # fmt: skip
    for key, value in summary["classify"].items():
        print(f"  classify.{key:13s} {value}")
    print(f"  {'seconds':22s} {summary['seconds']}")
    print(f"  {'summary':22s} {out / 'summary.json'}")
    print(f"  tensorboard --logdir {summary['tensorboard_dir']}")
