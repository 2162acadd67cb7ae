"""The data path at scale: a simulated shard folder of 1M-10M samples, and what one rank pays for it.

    python benchmarks/data_scale.py build OUT --num-samples 1000000
    python benchmarks/data_scale.py index OUT --workers 2
    python benchmarks/data_scale.py ranks OUT --world-size 8 --workers 2 [--num-ranks 8]
    python benchmarks/data_scale.py opens OUT --backend wds --num-reads 20000

`build` writes a few *real* shards (32x32 png16 images with roi.png, labels.npy and json, through the
tests' `write_shard_folder`, i.e. the project's own `ShardTarWriter`, so their idx files are real),
then hard-links them under as many shard names as the sample count needs (`link_scaled_folder`: a
copy of the real idx beside each link, a manifest consistent with the links). No image is stored
twice: a 10M folder costs its idx files (~1.5 GB) and a few MB of tars. Keys repeat from one link of
a real tar to the next (a hard link cannot change member names), which `verify` reports as duplicates.
`index` times the compact index build (`xray-shard index`, once per folder).

`ranks` starts `--num-ranks` rank processes of a `--world-size` job at once (each: build the train
loader with the wds backend and `--workers` DataLoader workers, take the first batch, then build the
val loader and take its first batch), waits until every rank holds its first batch, and then reads
each rank's memory from /proc (the rank process plus its workers): RSS, and PSS (pages shared by k
processes count 1/k, so the PSS of all ranks together is what the node pays). Run fewer ranks than the
world size where the machine cannot hold them all; each rank still reads only its own share.

`opens` reads through one backend in this process (wds with 0 workers, or DALI's host feed) and counts
file opens per sample read (every `open` / `os.open` in the process is counted).

Results: one JSON line per measurement on stdout. Timings here are wall-clock on whatever machine runs
it (see benchmarks/RESULTS.md for the machine); `ranks` also reports the load averages before and after.
"""

from __future__ import annotations

import argparse
import builtins
import gc
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parent.parent
SAMPLES_PER_SHARD = 1000
VAL_FRACTION = 0.1
IMAGE_HW = (32, 32)


def build(out: Path, num_samples: int) -> dict:
    """Real shards (2 train, 1 val, 1000 samples each) under out/_real, links to them in out."""
    sys.path.insert(0, str(REPO / "tests"))
    from data_fixtures import link_scaled_folder, write_shard_folder

    start = time.perf_counter()
    if out.exists():
        shutil.rmtree(out)
    write_shard_folder(out / "_real", splits={"train": 2 * SAMPLES_PER_SHARD, "val": SAMPLES_PER_SHARD},
                       samples_per_shard=SAMPLES_PER_SHARD, size_hw=IMAGE_HW)  # fmt: skip
    num_val = round(num_samples * VAL_FRACTION / SAMPLES_PER_SHARD)
    num_train = num_samples // SAMPLES_PER_SHARD - num_val
    manifest = link_scaled_folder(out / "_real", out, {"train": num_train, "val": num_val})
    result = {
        "bench": "build_folder",
        "num_samples": manifest["num_samples"],
        "num_shards": num_train + num_val,
    }
    result["seconds"] = round(time.perf_counter() - start, 1)
    return result


def index(folder: Path, workers: int) -> dict:
    """`xray-shard index`'s compact index build (once per folder), timed."""
    from xray_core.shardindex import index_folder

    start = time.perf_counter()
    path = index_folder(folder, workers)
    seconds = time.perf_counter() - start
    return {
        "bench": "index_build",
        "workers": workers,
        "seconds": round(seconds, 1),
        "bytes": path.stat().st_size,
    }


def _memory_kb(pid: int) -> tuple[int, int]:
    """(RSS, PSS) in kB of one process, from smaps_rollup."""
    fields = {}
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines()[1:]:
        name, value = line.split(":", 1)
        fields[name] = int(value.split()[0])
    return fields["Rss"], fields["Pss"]


def _children(pid: int) -> list[int]:
    found = []
    for task in Path(f"/proc/{pid}/task").iterdir():
        found += [int(c) for c in (task / "children").read_text().split()]
    return found


def rank_main(args: argparse.Namespace) -> None:
    """One rank: train loader + first batch, val loader + first batch; report, then hold."""
    start = time.perf_counter()
    from xray_pretrain.data.config import DataConfig
    from xray_pretrain.data.loader import build_train_loader, build_val_loader

    imported = time.perf_counter()
    cfg = DataConfig(shards=[str(args.folder)], backend="wds", num_workers=args.workers)
    size = IMAGE_HW
    common = dict(image_size=size, micro_batch=args.micro_batch, rank=args.rank, world_size=args.world_size)
    train = build_train_loader(cfg, accum_steps=1, seed=0, **common)
    built = time.perf_counter()
    batch = next(iter(train))
    first = time.perf_counter()
    val = build_val_loader(cfg, **common)
    val_built = time.perf_counter()
    val_batch = next(iter(val))
    val_first = time.perf_counter()
    gc.collect()  # a full collection walks every tracked object: its pause grows with them
    gc_full = time.perf_counter() - val_first
    report = {
        "rank": args.rank,
        "pid": os.getpid(),
        "import_s": round(imported - start, 2),
        "train_build_s": round(built - imported, 2),
        "first_batch_s": round(first - imported, 2),  # loader build + first batch (what a rank waits)
        "val_build_s": round(val_built - first, 2),
        "val_first_batch_s": round(val_first - first, 2),
        "gc_full_s": round(gc_full, 3),
        "gc_tracked_objects": len(gc.get_objects()),
        "batch_keys": len(batch["key"]) + len(val_batch["key"]),
    }
    Path(args.report).write_text(json.dumps(report))
    release = Path(args.report + ".release")
    while not release.exists():
        time.sleep(0.2)


def ranks(args: argparse.Namespace) -> list[dict]:
    work = Path(args.folder).parent / f"_ranks_{os.getpid()}"
    work.mkdir()
    procs = []
    for rank in range(args.num_ranks):
        report = work / f"rank{rank}.json"
        cmd = [sys.executable, __file__, "rank", str(args.folder), "--rank", str(rank), "--report", str(report),
               "--world-size", str(args.world_size), "--workers", str(args.workers),
               "--micro-batch", str(args.micro_batch)]  # fmt: skip
        procs.append((subprocess.Popen(cmd), report))
    try:
        while not all(r.exists() or p.poll() is not None for p, r in procs):
            time.sleep(0.5)
        time.sleep(1.0)  # workers settle after the first batch
        results = []
        for proc, report in procs:
            if proc.poll() is not None:
                raise SystemExit(f"a rank exited with {proc.returncode}")
            result = json.loads(report.read_text())
            pids = [proc.pid, *_children(proc.pid)]
            memory = [_memory_kb(pid) for pid in pids]
            result.update(
                num_processes=len(pids),
                rss_mb=round(sum(m[0] for m in memory) / 1024, 1),
                pss_mb=round(sum(m[1] for m in memory) / 1024, 1),
            )
            results.append(result)
    finally:
        for _proc, report in procs:
            Path(str(report) + ".release").write_text("")
        for proc, _report in procs:
            proc.wait()
        shutil.rmtree(work)
    return results


class _OpenCounter:
    """Counts every open() and os.open() in this process while installed."""

    def __init__(self):
        self.count = 0
        self._open, self._os_open = builtins.open, os.open

    def __enter__(self):
        def counting_open(*a, **k):
            self.count += 1
            return self._open(*a, **k)

        def counting_os_open(*a, **k):
            self.count += 1
            return self._os_open(*a, **k)

        builtins.open, os.open = counting_open, counting_os_open
        return self

    def __exit__(self, *exc):
        builtins.open, os.open = self._open, self._os_open


def opens(args: argparse.Namespace) -> dict:
    """Opens per read over `num_reads` training samples of one backend, after the loader is built."""
    from xray_pretrain.data.config import DataConfig
    from xray_pretrain.data.loader import build_train_loader

    workers = 0 if args.backend == "wds" else 1
    cfg = DataConfig(shards=[str(args.folder)], backend=args.backend, num_workers=workers)
    loader = build_train_loader(
        cfg, image_size=IMAGE_HW, micro_batch=args.micro_batch, accum_steps=1, rank=0, world_size=1, seed=0
    )
    num_shards = len({e["name"] for e in json.loads((Path(args.folder) / "manifest.json").read_text())["shards"]
                      if e["split"] == "train"})  # fmt: skip
    batches = iter(loader)
    num_reads = 0
    start = time.perf_counter()
    with _OpenCounter() as counter:
        while num_reads < args.num_reads // 2:
            num_reads += len(next(batches)["key"])
        num_first_half = (num_reads, counter.count)
        while num_reads < args.num_reads:
            num_reads += len(next(batches)["key"])
    return {
        "bench": "opens",
        "backend": args.backend,
        "num_train_shards": num_shards,
        "num_reads": num_reads,
        "num_opens": counter.count,
        "opens_per_read": round(counter.count / num_reads, 4),
        "opens_per_read_second_half": round(
            (counter.count - num_first_half[1]) / (num_reads - num_first_half[0]), 4
        ),
        "seconds": round(time.perf_counter() - start, 1),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("build")
    p.add_argument("folder", type=Path)
    p.add_argument("--num-samples", type=int, required=True)
    p = sub.add_parser("index")
    p.add_argument("folder", type=Path)
    p.add_argument("--workers", type=int, default=1)
    for name in ("ranks", "rank", "opens"):
        p = sub.add_parser(name)
        p.add_argument("folder", type=Path)
        p.add_argument("--world-size", type=int, default=8)
        p.add_argument("--workers", type=int, default=2)
        p.add_argument("--micro-batch", type=int, default=4)
    sub.choices["ranks"].add_argument("--num-ranks", type=int, default=8)
    sub.choices["rank"].add_argument("--rank", type=int, required=True)
    sub.choices["rank"].add_argument("--report", required=True)
    sub.choices["opens"].add_argument("--backend", default="wds", choices=["wds", "dali"])
    sub.choices["opens"].add_argument("--num-reads", type=int, default=20000)
    args = parser.parse_args()
    if args.command == "build":
        print(json.dumps(build(args.folder, args.num_samples)))
    elif args.command == "index":
        print(json.dumps(index(args.folder, args.workers)))
    elif args.command == "rank":
        rank_main(args)
    elif args.command == "ranks":
        load_before = os.getloadavg()  # the machine's load is part of every timing here
        results = ranks(args)
        for result in results:
            print(
                json.dumps(
                    {"bench": "rank", "world_size": args.world_size, "workers": args.workers, **result}
                )
            )
        total_pss = sum(r["pss_mb"] for r in results)
        first_batch = [r["first_batch_s"] for r in results]
        print(
            json.dumps(
                {
                    "bench": "ranks_total",
                    "num_ranks": len(results),
                    "pss_mb": round(total_pss, 1),
                    "first_batch_s_max": max(first_batch),
                    "load_avg_1_5_15_before": [round(x, 2) for x in load_before],
                    "load_avg_1_5_15_after": [round(x, 2) for x in os.getloadavg()],
                }
            )
        )
    else:
        print(json.dumps(opens(args)))


if __name__ == "__main__":
    main()
