"""What recording and verifying a checkpoint's manifest costs, per GB written (engine/manifest.py).

Three numbers for one file of ``--gb`` GB of fp32 tensors (what one rank writes of a checkpoint):

1. save: ``torch.save`` to a path (what DeepSpeed does) vs ``manifest.write_file`` (the same bytes
   through a sha256 and an fsync; what every rank does here); the difference is the recording cost;
2. verify sizes: one stat per file (every candidate a resume looks at);
3. verify checksums: one read + sha256 of the file (the checkpoint a resume loads, split over the
   ranks; export and init.weights in one process); from the page cache unless ``--cold`` (drops the
   whole machine's page cache first: root only, and not on a machine others are using).

ViT-L MAE at 1280² (~330 M parameters incl. the decoder): bf16 model states ~0.7 GB on rank 0, fp32
master weights + Adam moments ~4 GB split over the data-parallel ranks; so rank 0 of 8 writes ~1.2 GB.
Scale the per-GB numbers by that.

    nice -n 10 env OMP_NUM_THREADS=1 PYTHONPATH=. python benchmarks/checkpoint_integrity.py --gb 1
"""

from __future__ import annotations

import argparse
import os
import subprocess
import tempfile
import time
from pathlib import Path

import torch

from xray_pretrain.engine.manifest import file_record, write_file


def _best_of(repeats: int, fn) -> float:
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return min(times)


def _drop_page_cache() -> bool:
    done = subprocess.run(["sh", "-c", "sync && echo 1 > /proc/sys/vm/drop_caches"], capture_output=True)
    return done.returncode == 0


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--gb", type=float, default=1.0)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--dir", type=Path, default=None, help="where to write (default: a temp folder)")
    parser.add_argument("--cold", action="store_true", help="drop the page cache before the checksum")
    args = parser.parse_args()
    state = {"w": torch.randn(int(args.gb * 2**30 / 4))}
    with tempfile.TemporaryDirectory(dir=args.dir) as folder:
        plain, recorded = Path(folder) / "plain.pt", Path(folder) / "recorded.pt"
        t_plain = _best_of(args.repeats, lambda: torch.save(state, plain))
        t_recorded = _best_of(args.repeats, lambda: write_file(recorded, lambda f: torch.save(state, f)))
        t_sizes = _best_of(args.repeats, lambda: recorded.stat().st_size)
        cold = args.cold and _drop_page_cache()
        t_checksum = _best_of(1, lambda: file_record(recorded))
        num_gb = recorded.stat().st_size / 2**30
    print(f"file: {num_gb:.2f} GiB")
    print(f"save, torch.save to a path:          {t_plain:6.2f} s ({num_gb / t_plain:.2f} GiB/s)")
    print(f"save, through sha256 + fsync:        {t_recorded:6.2f} s (+{t_recorded - t_plain:.2f} s)")
    print(f"verify sizes (stat):                 {t_sizes * 1e6:6.1f} us")
    print(f"verify checksum ({'cold' if cold else 'warm'} cache): {t_checksum:6.2f} s "
          f"({num_gb / t_checksum:.2f} GiB/s)")  # fmt: skip
    print(f"(os.cpu_count() = {os.cpu_count()}, torch threads = {torch.get_num_threads()})")


if __name__ == "__main__":
    main()
