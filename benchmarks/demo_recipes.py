"""The demo's classification stage under each recipe of `xray_pretrain.demo_classify.RECIPES`, on one
`xray-pretrain demo --out DIR` folder (its pre-training run, shards and held-out test shards), in one
process: what `DEFAULT_RECIPE` is chosen from (benchmarks/RESULTS.md).

    export OMP_NUM_THREADS=1 PYTHONPATH=$PWD
    nice -n 10 python benchmarks/demo_recipes.py --demo runs/demo --out runs/demo_recipes.jsonl  # every recipe

One JSON line per recipe: the stage's `summary["classify"]`, its details (per seed: test mean AUROC,
per-label AUROC, what validation chose, for every row) and its cost (`cpu_s`: process CPU time, one
thread as the stage runs; `wall_s`).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path

from xray_pretrain.demo_classify import RECIPES, compare


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--demo", type=Path, required=True, help="an `xray-pretrain demo --out` folder")
    p.add_argument("--recipe", nargs="+", default=list(RECIPES), choices=list(RECIPES))
    p.add_argument("--out", type=Path, required=True, help="JSON lines, appended")
    args = p.parse_args()
    for name in args.recipe:
        cpu, wall = time.process_time(), time.perf_counter()
        result = compare(args.demo / "run", args.demo / "shards", args.demo / "test_shards", RECIPES[name])
        record = {"recipe": name, **result, "cpu_s": round(time.process_time() - cpu, 1),
                  "wall_s": round(time.perf_counter() - wall, 1)}  # fmt: skip
        with open(args.out, "a") as f:
            f.write(json.dumps(record) + "\n")
        print(json.dumps({"recipe": name, **record["classify"], "cpu_s": record["cpu_s"]}), flush=True)


if __name__ == "__main__":
    main()
