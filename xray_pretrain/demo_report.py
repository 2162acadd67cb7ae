"""The demo's report stage: a report generator fine-tuned from the pre-training run, scored on the
held-out phantoms against the controls it must beat.

`xray-pretrain finetune --config report_phantom` runs under the deepspeed launcher as a user would
run it (selection on validation BLEU-4, its own test split scored once into metrics.json). The
summary's scores come from the held-out phantoms of a second `synth` seed, every split of them (the
520 the classifiers are scored on), not from the run's 51-item test split: CIDEr-D weighs n-grams by
their document frequency over the references scored, and over 51 templated reports a few items
move the generator-to-baseline ratio by more than the gap it measures (benchmarks/RESULTS.md).
The run's own test scores are kept beside them (`report/heldout.json`, printed).

Controls, on the same held-out items: `baseline`, the training split's most common report given to
every item; `shuffled_cider`, the same generator fed another study's images (what it writes without
reading the image it is asked about).
"""

from __future__ import annotations

import json
from collections import Counter
from pathlib import Path

REPORT_CONFIG = "report_phantom"  # the stage's packaged config
REPORT_KEYS = ("bleu_4", "meteor", "rouge_l", "cider")  # summary["report"] (and its baseline)
SPLITS = ("train", "val", "test")  # the held-out shards are scored whole
GENERATION_BATCH = 64


def report_stage(
    pretrain_run: Path, shards: Path, heldout_shards: Path, out: Path, num_ranks: int, seed: int
) -> dict:
    """Fine-tune `report_phantom` from `pretrain_run` on `shards`, then score its best checkpoint and
    the controls on every split of `heldout_shards`. Returns summary["report"]."""
    from xray_pretrain.engine.launch import launch_training

    overrides = [f"data.shards=[{shards}]", f"log.out_dir={out}", f"init.weights={pretrain_run}",
                 f"train.seed={seed}", "log.progress=false"]  # fmt: skip
    out.mkdir(parents=True)
    launch_training(REPORT_CONFIG, overrides, num_ranks, out / "train.log", command="finetune")
    in_run = json.loads((out / "metrics.json").read_text())["test"]
    scored = score_heldout(out, shards, heldout_shards)
    report = scored.pop("report")
    (out / "heldout.json").write_text(
        json.dumps({**scored, "summary": report, "run_test_split": in_run}, indent=2)
    )
    print(
        f"  held-out phantoms ({scored['num_reports']} reports): "
        + ", ".join(f"{k} {fmt_score(report[k])}" for k in REPORT_KEYS)
        + "\n  most common training report: " + ", ".join(f"{k} {fmt_score(report['baseline'][k])}" for k in REPORT_KEYS)
        + f"\n  other studies' images: cider {fmt_score(report['shuffled_cider'])}"
        + f"\n  the run's own test split ({in_run['test_num_reports']} reports, metrics.json): "
        + ", ".join(f"{k} {fmt_score(in_run[f'test_{k}'])}" for k in REPORT_KEYS),
        flush=True,
    )  # fmt: skip
    return report


def fmt_score(value) -> str:
    return "null" if value is None else f"{value:.3f}"


def score_heldout(report_run: Path, train_shards: Path, heldout_shards: Path) -> dict:
    """The run's best checkpoint on every split of `heldout_shards`: {"report": {REPORT_KEYS...,
    "baseline": {...}, "shuffled_cider"}, "num_reports", "csv"} (the generated reports go to
    `report_run/heldout.csv`: key, reference, generated)."""
    import torch

    from xray_pretrain.data.loader import build_val_loader
    from xray_pretrain.data.reports import train_report_texts
    from xray_pretrain.data.shards import SplitTable, open_folders
    from xray_pretrain.inference import load_trained, write_reports_csv
    from xray_pretrain.report.metrics import score_reports, score_systems

    trained = load_trained(report_run, device="cpu", tasks=("report",))
    task, cfg, rcfg = trained.task, trained.cfg, trained.cfg.report
    trained.model.eval()
    train_texts = train_report_texts(
        SplitTable(open_folders([str(train_shards)]), "train"), rcfg.section, rcfg.views
    )
    most_common = Counter(task.tokenizer.clean(t) for t in train_texts).most_common(1)[0][0]
    cfg.data.shards, cfg.data.val_shards = [str(heldout_shards)], None
    rows: dict[str, list] = {"key": [], "image": [], "reference": []}
    for split in SPLITS:
        loader = build_val_loader(
            cfg.data, image_size=tuple(trained.info["image_size"]), micro_batch=GENERATION_BATCH,
            rank=0, world_size=1, whole_split=True, split=split, reports=cfg.loader_reports(),
        )  # fmt: skip
        for batch in loader:
            real = (batch["weight"] > 0).tolist()
            rows["key"] += [k for k, r in zip(batch["key"], real) if r]
            rows["image"] += [image for image, r in zip(batch["image"], real) if r]
            rows["reference"] += [t for t, r in zip(batch["report"], real) if r]
    if not rows["key"]:
        raise ValueError(f"no report items in {heldout_shards}: the held-out phantoms need reports")

    def generate(order: list[int]) -> list[str]:
        generated = []
        for start in range(0, len(order), GENERATION_BATCH):
            images = torch.stack([rows["image"][i] for i in order[start : start + GENERATION_BATCH]])
            generated += task.generate(trained.model, images)
        return generated

    references = [task.tokenizer.clean(r) for r in rows["reference"]]
    rows["generated"] = generate(list(range(len(references))))
    # METEOR (null without Java) whatever the run's report.meteor: one JVM for generator and baseline.
    scores, baseline = score_systems(references, [rows["generated"], [most_common] * len(references)])
    heldout = open_folders([str(heldout_shards)])
    tables = [SplitTable(heldout, split) for split in SPLITS]
    shuffled = score_reports(references, generate(other_study_order(rows["key"], tables)), meteor=False)
    csv_path = report_run / "heldout.csv"
    write_reports_csv(csv_path, task, rows)
    report = {key: scores[key] for key in REPORT_KEYS}
    report["baseline"] = {key: baseline[key] for key in REPORT_KEYS}
    report["shuffled_cider"] = shuffled["cider"]
    return {"report": report, "num_reports": len(references), "csv": str(csv_path)}


def other_study_order(keys: list[str], tables: list) -> list[int]:
    """For item i (of `keys`, found in one of `tables`), the index of an item of another study: items
    sorted by study, each takes the item as many places on as the largest study has images (so
    never its own study)."""
    from xray_pretrain.data.shards import ShardReader

    reader = ShardReader()
    try:
        study_of = {
            table.key(f, i): str(table.metadata(reader, f, i).get("study") or table.key(f, i))
            for table in tables
            for f, size in enumerate(table.folder_sizes)
            for i in range(size)
        }
    finally:
        reader.close()
    by_study = sorted(range(len(keys)), key=lambda i: (study_of[keys[i]], keys[i]))
    shift = max(Counter(study_of[k] for k in keys).values())
    other = [0] * len(keys)
    for place, item in enumerate(by_study):
        other[item] = by_study[(place + shift) % len(keys)]
    if any(study_of[keys[i]] == study_of[keys[j]] for i, j in enumerate(other)):
        raise ValueError("too few studies to feed every item another study's images")
    return other
