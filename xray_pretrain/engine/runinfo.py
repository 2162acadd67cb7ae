"""Facts about a run written beside its resolved config: git revision, versions, world size."""

from __future__ import annotations

import importlib.metadata
import platform
import socket
import subprocess
import time
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]


def package_version() -> str:
    try:
        return importlib.metadata.version("xray_pretrain")
    except importlib.metadata.PackageNotFoundError:
        return "unknown"


def git_revision() -> dict:
    """The checkout's revision; an installed wheel has none (and must not report an enclosing repo's)."""
    if not (REPO_ROOT / "setup.py").is_file():
        return {"commit": "installed package", "dirty": False}

    def git(*args: str) -> str:
        try:
            out = subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10)
        except (OSError, subprocess.TimeoutExpired):
            return ""
        return out.stdout.strip() if out.returncode == 0 else ""

    return {
        "commit": git("rev-parse", "HEAD") or "unknown",
        "dirty": bool(git("status", "--porcelain", "--untracked-files=no")),
    }


def run_info(cfg, world_size: int, accum_steps: int, ds_config: dict, device=None) -> dict:
    import torch

    from xray_pretrain.models import describe_attention_backend

    embed_dim, _, num_heads = cfg.model.encoder_dims()

    try:
        import deepspeed

        ds_version = deepspeed.__version__
    except ImportError:
        ds_version = None
    return {
        "git": git_revision(),
        "xray_pretrain": package_version(),
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
        "host": socket.gethostname(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "deepspeed": ds_version,
        "world_size": world_size,
        "accum_steps": accum_steps,
        "peak_lr": cfg.optim.lr(cfg.train.global_batch),
        # The kernel that really runs, e.g. "sdpa:auto->flash": `auto` alone would not say.
        "attention": describe_attention_backend(
            cfg.model.attn, device, cfg.train.dtype, embed_dim // num_heads
        ),
        "ds_config": ds_config,
    }
