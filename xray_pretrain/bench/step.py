"""`xray-pretrain bench step`: time MAE training steps (torch alone, plain AdamW) and print one JSON line.

    xray-pretrain bench step --config vitl_1280 --batch-size 8 --device cuda
    xray-pretrain bench step --config vitl_1280 model.size=base model.grad_ckpt=false --batch-size auto
    PYTHONPATH=. python -m xray_pretrain.bench.step model.size=base model.image_size=1280 --batch-size 4

Configured like training: `--config FILE_OR_NAME` plus `section.key=value` overrides; the model comes
from the `model` and `mask` sections, the precision and seed from `train` (the data section is not
used). The older flags (`--model`, `--image-size`, `--patch`, `--precision`, `--grad-ckpt`, ...) stay
as shorthands for those keys (`SHORTHANDS`) and are applied after the overrides. Without `--config`
the defaults of `xray_pretrain/config.py` apply (a tiny model at 224 px).

Synthetic inputs (random images; for context masking a central-ellipse chest region), warm-up steps
excluded from the timing. Output keys: s_per_step, images_per_s, tflops (achieved model TFLOP/s, see
``models.flops`` for the convention), mfu (vs the datasheet peak; null where unknown, e.g. CPUs unless
--peak-tflops), peak_mem_mib (CUDA: max_memory_allocated; CPU: peak RSS minus the RSS before the model
was built), plus the configuration.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import resource
import sys
import time
from pathlib import Path

import torch

from xray_pretrain.config import RunConfig, load_config
from xray_pretrain.models import (
    ATTN_BACKENDS,
    ENCODER_SIZES,
    STEMS,
    STRATEGIES,
    MAEConfig,
    MaskConfig,
    build_mae,
    describe_attention_backend,
    device_peak_flops,
    estimate_step_flops,
    mfu,
    suggest_batch_size,
)

# Shorthand flag -> (config key, argparse options). `--grad-ckpt` is a switch for model.grad_ckpt=true.
SHORTHANDS = {
    "--model": ("model.size", {"choices": tuple(ENCODER_SIZES)}),
    "--image-size": ("model.image_size", {"help": "PX or HxW, e.g. 1280 or 1024x1280"}),
    "--patch": ("model.patch_size", {"type": int}),
    "--stem": ("model.stem", {"choices": STEMS}),
    "--precision": ("train.precision", {"choices": ("fp32", "bf16", "fp16")}),
    "--attn": ("model.attn", {"choices": ATTN_BACKENDS}),
    "--mask": ("mask.strategy", {"choices": STRATEGIES}),
    "--mask-ratio": ("mask.ratio", {"type": float}),
    "--decoder-heads": ("model.decoder_heads", {"type": int}),
    "--decoder-dim": ("model.decoder_dim", {"type": int}),
    "--decoder-depth": ("model.decoder_depth", {"type": int}),
    "--embed-dim": ("model.embed_dim", {"type": int}),
    "--depth": ("model.depth", {"type": int}),
    "--num-heads": ("model.num_heads", {"type": int}),
    "--seed": ("train.seed", {"type": int}),
}
BENCH_SECTIONS = ("model", "mask", "train")  # the sections this benchmark reads (and validates)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--config", default=None, help="run config file or packaged name (default: defaults)")
    parser.add_argument(
        "overrides", nargs="*", metavar="section.key=value", help="e.g. model.size=large model.grad_ckpt=true"
    )
    parser.add_argument(
        "--batch-size", default="8", help="images per step, or 'auto' (analytic memory model)"
    )
    parser.add_argument("--max-batch-size", type=int, default=64, help="cap for --batch-size auto")
    parser.add_argument("--steps", type=int, default=10, help="timed steps")
    parser.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    parser.add_argument("--device", choices=("cpu", "cuda"), default=None, help="default: cuda if available")
    parser.add_argument(
        "--peak-tflops", type=float, default=None, help="peak for MFU where the table has none"
    )
    shorthands = parser.add_argument_group("shorthands for config keys (applied after the overrides)")
    for flag, (key, options) in SHORTHANDS.items():
        shorthands.add_argument(flag, default=None, help=options.pop("help", key), **options)
    shorthands.add_argument("--grad-ckpt", action="store_true", help="model.grad_ckpt=true")


def _image_size(text: str) -> list[int]:
    parts = text.lower().split("x")
    if len(parts) not in (1, 2) or not all(p.strip().isdigit() for p in parts):
        raise ValueError(f"--image-size {text!r}: use PX (e.g. 1280) or HxW (e.g. 1024x1280)")
    sizes = [int(p) for p in parts]
    return sizes * 2 if len(sizes) == 1 else sizes


def config_from_args(args: argparse.Namespace) -> RunConfig:
    """The run config this benchmark measures: file <- overrides <- shorthand flags."""
    overrides = list(args.overrides)
    for flag, (key, _) in SHORTHANDS.items():
        value = getattr(args, flag.lstrip("-").replace("-", "_"))
        if value is not None:
            value = _image_size(str(value)) if flag == "--image-size" else value
            overrides.append(f"{key}={json.dumps(value) if not isinstance(value, str) else value}")
    if args.grad_ckpt:
        overrides.append("model.grad_ckpt=true")
    return load_config(args.config, overrides, sections=BENCH_SECTIONS)


def configs_from_args(args: argparse.Namespace) -> tuple[MAEConfig, MaskConfig]:
    cfg = config_from_args(args)
    return cfg.model, cfg.mask


def central_ellipse_roi(batch_size: int, height: int, width: int, device: torch.device) -> torch.Tensor:
    """(B, 1, H, W) uint8 chest-like region: an ellipse covering the central ~55% of the image."""
    rows = (torch.arange(height, device=device) + 0.5) / height - 0.5
    cols = (torch.arange(width, device=device) + 0.5) / width - 0.5
    inside = (rows[:, None] / 0.42) ** 2 + (cols[None, :] / 0.4) ** 2 <= 1.0
    return inside.to(torch.uint8).expand(batch_size, 1, height, width)


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * resource.getpagesize()


def _reset_peak_rss() -> bool:
    """Reset the kernel's peak-RSS mark (Linux >= 4.0), so a peak read later belongs to this run."""
    try:
        Path("/proc/self/clear_refs").write_text("5")
        return True
    except OSError:
        return False


def _peak_rss_bytes() -> int:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux reports KiB


def _resolve_device(name: str | None) -> torch.device:
    """``cuda`` -> the current CUDA device *with* its index (torch.cuda memory APIs need one)."""
    if name == "cuda" and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is visible here; use --device cpu")
    if name == "cpu" or not torch.cuda.is_available():
        return torch.device("cpu")
    return torch.device("cuda", torch.cuda.current_device())


def _batch_size(args, cfg: MAEConfig, mask_cfg: MaskConfig, precision: str, device: torch.device) -> int:
    if str(args.batch_size) != "auto":
        if not str(args.batch_size).isdigit() or int(args.batch_size) < 1:
            raise ValueError(f"--batch-size {args.batch_size!r}: use a positive integer or 'auto'")
        return int(args.batch_size)
    if device.type == "cuda":
        memory = torch.cuda.get_device_properties(device).total_memory
    else:
        memory = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    batch = suggest_batch_size(cfg, mask_cfg, memory, precision, max_batch_size=args.max_batch_size)
    if batch < 1:
        raise ValueError(
            f"--batch-size auto: not even one image fits in {memory / 2**30:.0f} GiB; use model.grad_ckpt=true"
        )
    return batch


def _train_step(model, optimizer, scaler, images, roi, autocast_dtype, device) -> torch.Tensor:
    with torch.autocast(device.type, dtype=autocast_dtype, enabled=autocast_dtype is not None):
        loss = model(images, roi).loss
    optimizer.zero_grad(set_to_none=True)
    if scaler is not None:
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
    else:
        loss.backward()
        optimizer.step()
    return loss.detach()


def _timed_steps(step, num_steps: int, device: torch.device) -> tuple[float, float]:
    """(seconds per step, last loss) over ``num_steps`` calls of ``step``."""
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)
    sync()
    start = time.perf_counter()
    loss = torch.zeros(())
    for _ in range(num_steps):
        loss = step()
    sync()
    return (time.perf_counter() - start) / num_steps, float(loss)


def run(args: argparse.Namespace) -> int:
    """Build, warm up, time, print one JSON line. User errors raise ``ValueError`` before any work."""
    run_cfg = config_from_args(args)
    cfg, mask_cfg, precision = run_cfg.model, run_cfg.mask, run_cfg.train.precision
    device = _resolve_device(args.device)
    if args.steps < 1 or args.warmup < 0:
        raise ValueError("--steps must be >= 1 and --warmup >= 0")
    autocast_dtype = None if precision == "fp32" else run_cfg.train.dtype
    batch_size = _batch_size(args, cfg, mask_cfg, precision, device)
    torch.manual_seed(run_cfg.train.seed)
    rss_before = _rss_bytes()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    reset_ok = _reset_peak_rss()
    model = build_mae(cfg, mask_cfg).to(device).train()
    H, W = cfg.image_hw()
    images = torch.randn(batch_size, cfg.in_chans, H, W, device=device)
    roi = central_ellipse_roi(batch_size, H, W, device) if mask_cfg.strategy == "context" else None
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, weight_decay=0.05, fused=device.type == "cuda")
    scaler = torch.amp.GradScaler(device.type) if precision == "fp16" else None

    def step() -> torch.Tensor:
        return _train_step(model, optimizer, scaler, images, roi, autocast_dtype, device)

    if args.warmup:
        _timed_steps(step, args.warmup, device)
    s_per_step, loss = _timed_steps(step, args.steps, device)
    print(json.dumps(_result(args, run_cfg, device, batch_size, s_per_step, loss, rss_before, reset_ok)))
    return 0


def _sig(value: float, digits: int = 5) -> float:
    return float(f"{value:.{digits}g}")


def _result(args, run_cfg: RunConfig, device, batch_size, s_per_step, loss, rss_before, reset_ok) -> dict:
    cfg, mask_cfg, precision = run_cfg.model, run_cfg.mask, run_cfg.train.precision
    flops = estimate_step_flops(cfg, mask_cfg, batch_size)
    peak = args.peak_tflops * 1e12 if args.peak_tflops else device_peak_flops(device, precision)
    utilisation = mfu(flops["total"], s_per_step, peak)
    if device.type == "cuda":
        peak_mem, mem_source = torch.cuda.max_memory_allocated(device), "cuda.max_memory_allocated"
    else:
        peak_mem = _peak_rss_bytes() - rss_before
        mem_source = "rss_hwm_delta" if reset_ok else "ru_maxrss_delta (process-lifetime peak)"
    embed_dim, depth, num_heads = cfg.encoder_dims()
    return {
        "s_per_step": _sig(s_per_step),
        "images_per_s": _sig(batch_size / s_per_step),
        "tflops": _sig(flops["total"] / s_per_step / 1e12),
        "mfu": None if math.isnan(utilisation) else _sig(utilisation),
        "peak_mem_mib": round(peak_mem / 2**20, 1),
        "peak_mem_source": mem_source,
        "loss": _sig(loss),
        "flops_per_step": flops["total"],
        "model": cfg.size,
        "embed_dim": embed_dim,
        "depth": depth,
        "num_heads": num_heads,
        "image_size": cfg.image_hw(),
        "patch": cfg.patch_size,
        "stem": cfg.stem,
        "tokens": cfg.image_hw()[0] * cfg.image_hw()[1] // cfg.token_patch() ** 2,
        "batch_size": batch_size,
        "steps": args.steps,
        "warmup": args.warmup,
        "precision": precision,
        "grad_ckpt": cfg.grad_ckpt,
        "attn": cfg.attn,
        "attn_backend": describe_attention_backend(
            cfg.attn, device, run_cfg.train.dtype, cfg.decoder_dim // cfg.decoder_heads
        ),
        "mask": mask_cfg.strategy,
        "mask_ratio": mask_cfg.ratio,
        "decoder_dim": cfg.decoder_dim,
        "decoder_depth": cfg.decoder_depth,
        "decoder_heads": cfg.decoder_heads,
        "device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu",
        "torch": torch.__version__,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m xray_pretrain.bench.step", description=__doc__.splitlines()[0]
    )
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        return run(args)
    except ValueError as err:
        parser.error(str(err))
    return 2


if __name__ == "__main__":
    sys.exit(main())
