"""One DeepSpeed training loop for every task.

The loop owns what every task shares: ZeRO, precision, accumulation toward a fixed global batch,
the LR schedule, checkpoint/resume, validation and image cadence, throughput and MFU. What is
specific to a task (its model, loss, metrics) comes from `xray_pretrain.tasks`.

Reproducibility: data order and augmentation depend only on (seed, global sample position), and
the torch RNG (masking noise) is reseeded from (seed, step, rank) at every optimizer step, so a
resumed run replays exactly what an uninterrupted one would have done.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from xray_pretrain.config import RunConfig
from xray_pretrain.engine import checkpoint
from xray_pretrain.engine.dist import DistContext, all_reduce_mean, init_distributed
from xray_pretrain.engine.ds_config import build_ds_config
from xray_pretrain.engine.monitor import RunMonitor
from xray_pretrain.engine.optim import build_optimizer, lr_at, set_lr
from xray_pretrain.engine.runinfo import run_info
from xray_pretrain.tasks import build_task

DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


@dataclass
class TrainState:
    step: int = 0  # optimizer steps done
    samples_seen: int = 0  # global data position (sum over ranks)
    first_loss: float | None = None
    last_loss: float | None = None


def train(cfg: RunConfig) -> dict:
    """Train `cfg.task` for `cfg.train.steps` optimizer steps; returns a summary (rank 0's view)."""
    import deepspeed

    ctx = init_distributed()
    if cfg.train.precision == "fp16" and ctx.device.type != "cuda":
        raise ValueError(
            "train.precision=fp16 needs a GPU (DeepSpeed's CPU accelerator has no fp16): use bf16 or fp32"
        )
    accum = cfg.train.accum_steps(ctx.world_size)
    out_dir = Path(cfg.log.out_dir)
    ckpt_dir = out_dir / "checkpoints"
    torch.manual_seed(cfg.train.seed)
    task = build_task(cfg)
    model = task.build_model()
    peak_lr = cfg.optim.lr(cfg.train.global_batch)
    optimizer = build_optimizer(model, peak_lr, cfg.optim.weight_decay, tuple(cfg.optim.betas))
    ds_config = build_ds_config(cfg, ctx.world_size)
    engine, optimizer, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
    if cfg.train.compile:
        engine.compile()
    state = _maybe_resume(cfg, engine, ckpt_dir)
    if ctx.is_main:
        info = run_info(cfg, ctx.world_size, accum, ds_config, ctx.device)
        print(
            f"attention: {info['attention']}, world size {ctx.world_size}, accumulation {accum}", flush=True
        )
        out_dir.mkdir(parents=True, exist_ok=True)
        from xray_pretrain.config import save_resolved_config

        save_resolved_config(cfg, out_dir, info)
    loaders = _build_loaders(cfg, ctx, accum, state.samples_seen)
    monitor = RunMonitor(out_dir, ctx.is_main, cfg.train.steps, state.step, cfg.log.progress)
    monitor.text("config", "```\n" + json.dumps(cfg.to_dict(), indent=2) + "\n```")
    try:
        summary = _loop(cfg, ctx, engine, optimizer, task, loaders, monitor, state, accum, peak_lr, ckpt_dir)
    finally:
        monitor.close()
    return summary


def _build_loaders(cfg: RunConfig, ctx: DistContext, accum: int, start_position: int):
    from xray_pretrain.data.loader import build_train_loader, build_val_loader

    common = dict(
        image_size=cfg.model.image_hw(),
        micro_batch=cfg.train.micro_batch,
        rank=ctx.rank,
        world_size=ctx.world_size,
    )
    train_loader = build_train_loader(
        cfg.data,
        accum_steps=accum,
        seed=cfg.train.seed,
        start_position=start_position,
        device=ctx.device.type,
        **common,
    )
    val_loader = build_val_loader(cfg.data, device=ctx.device.type, **common)
    return train_loader, val_loader


def _maybe_resume(cfg: RunConfig, engine, ckpt_dir: Path) -> TrainState:
    resume = cfg.checkpoint.resume
    if resume == "none":
        return TrainState()
    source = ckpt_dir if resume == "auto" else Path(resume)
    if resume == "auto" and not checkpoint.complete_tags(ckpt_dir):
        return TrainState()  # nothing to resume yet: a fresh start, as a requeued job expects
    root, tag = checkpoint.resolve_checkpoint(source)
    client = checkpoint.load(engine, root, tag)
    return TrainState(
        step=int(client["step"]),
        samples_seen=int(client["samples_seen"]),
        first_loss=client.get("first_loss"),
        last_loss=client.get("last_loss"),
    )


def _loop(cfg, ctx, engine, optimizer, task, loaders, monitor, state, accum, peak_lr, ckpt_dir) -> dict:
    train_loader, val_loader = loaders
    dtype = DTYPES[cfg.train.precision]
    flops_per_sample = task.flops_per_sample()
    peak_flops = cfg.log.peak_flops or _device_peak_flops(ctx.device, cfg.train.precision)
    matmul_ceiling = _matmul_ceiling(ctx.device, dtype)
    batches = iter(train_loader)
    summary: dict = {
        "world_size": ctx.world_size,
        "accum_steps": accum,
        "backend": getattr(train_loader, "backend", "?"),
    }
    last_val: dict = {}
    image_path = None
    while state.step < cfg.train.steps:
        step = state.step
        lr = lr_at(
            step,
            peak_lr=peak_lr,
            warmup_steps=cfg.optim.warmup_steps,
            total_steps=cfg.train.steps,
            min_lr=cfg.optim.min_lr,
        )
        set_lr(optimizer, lr)
        torch.manual_seed(cfg.train.seed * 1_000_003 + step * 4099 + ctx.rank)
        t_start = time.perf_counter()
        wait_s, loss_sum, task_logs = 0.0, 0.0, {}
        for _ in range(accum):
            t0 = time.perf_counter()
            batch = next(batches)
            wait_s += time.perf_counter() - t0
            loss, task_logs = task.training_loss(engine, batch, ctx.device, dtype)
            engine.backward(loss)
            engine.step()
            loss_sum += float(loss.detach())
        step_s = time.perf_counter() - t_start
        state.step += 1
        state.samples_seen += cfg.train.global_batch
        done = state.step == cfg.train.steps
        if state.step % cfg.log.every == 0 or state.step == 1 or done:
            loss_mean, wait_mean = all_reduce_mean([loss_sum / accum, wait_s], ctx.device)
            state.first_loss = loss_mean if state.first_loss is None else state.first_loss
            state.last_loss = loss_mean
            scalars = {
                "train/loss": loss_mean,
                "train/lr": lr,
                "train/grad_norm": _grad_norm(engine),
                "perf/images_per_s": cfg.train.global_batch / step_s,
                "perf/data_wait_s": wait_mean,
                "perf/step_s": step_s,
                **{f"train/{k}": float(v) for k, v in task_logs.items()},
            }
            if flops_per_sample:
                tflops = flops_per_sample * cfg.train.global_batch / step_s / ctx.world_size
                scalars["perf/tflops_per_device"] = tflops / 1e12
                scalars["perf/mfu"] = tflops / peak_flops
                scalars["perf/matmul_ceiling_fraction"] = tflops / matmul_ceiling
            if ctx.device.type == "cuda":
                scalars["perf/peak_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
            monitor.scalars(state.step, scalars)
            monitor.progress(state.step, {"loss": loss_mean, "img/s": scalars["perf/images_per_s"]})
        if state.step % cfg.log.val_every == 0 or done:
            last_val = task.evaluate(engine, val_loader, ctx.device, dtype)
            monitor.scalars(
                state.step,
                {"val/loss": last_val["val_loss"], "val/loss_baseline": last_val["val_loss_baseline"]},
            )
        if state.step % cfg.log.image_every == 0 or done:
            grid = task.preview_image(engine, val_loader, ctx.device, dtype, num_images=cfg.log.num_images)
            if grid is not None:
                image_path = monitor.image(state.step, "val/reconstruction", grid) or image_path
        if state.step % cfg.checkpoint.every == 0 or done:
            client = {
                "step": state.step,
                "samples_seen": state.samples_seen,
                "epoch": state.samples_seen // max(1, getattr(train_loader, "num_samples_per_epoch", 1)),
                "first_loss": state.first_loss,
                "last_loss": state.last_loss,
                "rng": checkpoint.rng_state(),
                "config": cfg.to_dict(),
            }
            checkpoint.save(
                engine, ckpt_dir, state.step, client, cfg.to_dict(), ctx.rank, cfg.checkpoint.keep_last
            )
    summary.update(
        steps=state.step,
        samples_seen=state.samples_seen,
        first_loss=state.first_loss,
        last_loss=state.last_loss,
        checkpoint_dir=str(ckpt_dir),
        tensorboard_dir=str(monitor.tb_dir),
        reconstruction_image=str(image_path) if image_path else None,
        **last_val,
    )
    return summary


def _grad_norm(engine) -> float:
    norm = engine.get_global_grad_norm()
    if norm is None:
        return float("nan")
    return float(norm)


def _matmul_ceiling(device: torch.device, dtype: torch.dtype) -> float:
    """Measured large-matmul FLOP/s of this device (GPUs only: a CPU measurement would cost seconds
    and say little); MFU against it separates kernel efficiency from the datasheet's optimism."""
    if device.type != "cuda":
        return float("nan")
    from xray_pretrain.models import measure_matmul_tflops

    return measure_matmul_tflops(device, dtype) * 1e12


def _device_peak_flops(device: torch.device, precision: str) -> float:
    try:
        from xray_pretrain.models.flops import device_peak_flops
    except ImportError:
        return float("nan")
    return float(device_peak_flops(device, precision))
