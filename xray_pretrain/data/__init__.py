"""Data loading: shard folders -> batches (see loader.py for the entry points).

- config.py   `DataConfig`, the run config's `data` section
- shards.py   shard folders (manifest, idx), label alignment, random-access reads
- order.py    the seeded global sample order and which rank reads which position
- heap.py     returning large freed temporaries to the OS
- augment.py  augmentation parameters per position and the host-side transform
- decode.py   host-side decoding (Pillow)
- wds.py      CPU backend: torch DataLoader
- dali.py     NVIDIA DALI backend (GPU decode; CPU-only pipelines where there is no GPU)
- loader.py   `build_train_loader` / `build_val_loader`: backend choice, one batch contract
- badsamples.py  corrupt samples: skipped, replaced by position (evaluation: a padding row), counted

Importing this package imports neither torch nor DALI.
"""

from xray_pretrain.data.config import DataConfig

__all__ = ["DataConfig"]
