"""One DeepSpeed training loop for every task.

The loop owns what every task shares: ZeRO, precision, accumulation toward a fixed global batch,
the LR schedule, checkpoint/resume, validation and image cadence, throughput and MFU. What is
specific to a task (its model, loss, metrics) comes from `xray_pretrain.tasks`.

Reproducibility: data order, augmentation and masking noise depend only on (seed, global sample
position), so a resumed run replays exactly what an uninterrupted one would have done, also on
another number of ranks. The torch RNG is still reseeded from (seed, step, rank) at every step for
whatever else a task draws.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from xray_pretrain.collectives import all_reduce_mean
from xray_pretrain.config import RunConfig, save_resolved_config
from xray_pretrain.engine import checkpoint, preempt
from xray_pretrain.engine.dist import DistContext, init_distributed
from xray_pretrain.engine.ds_config import build_ds_config
from xray_pretrain.engine.monitor import RunMonitor
from xray_pretrain.engine.optim import build_optimizer, lr_at, set_lr
from xray_pretrain.engine.runinfo import run_info, with_start_history
from xray_pretrain.models import mfu
from xray_pretrain.tasks import build_task


@dataclass
class TrainState:
    step: int = 0  # optimizer steps done
    samples_seen: int = 0  # global data position (sum over ranks)
    first_loss: float | None = None
    last_loss: float | None = None


@dataclass
class StepResult:
    loss_sum: torch.Tensor  # summed over micro-steps, on the device (no host sync per micro-step)
    task_logs: dict
    step_s: float
    data_wait_s: float


def train(cfg: RunConfig) -> dict:
    """Train `cfg.task` for `cfg.train.steps` optimizer steps; returns a summary (rank 0's view)."""
    trainer = Trainer(cfg)
    try:
        return trainer.run()
    finally:
        trainer.monitor.close()


class Trainer:
    def __init__(self, cfg: RunConfig):
        import deepspeed

        self.cfg = cfg
        self.ctx: DistContext = init_distributed()
        if cfg.train.precision == "fp16" and self.ctx.device.type != "cuda":
            raise ValueError(
                "train.precision=fp16 needs a GPU (DeepSpeed's CPU accelerator has no fp16): use bf16 or fp32"
            )
        self.dtype = cfg.train.dtype
        self.accum = cfg.train.accum_steps(self.ctx.world_size)
        self.out_dir = Path(cfg.log.out_dir)
        self.ckpt_dir = self.out_dir / "checkpoints"
        torch.manual_seed(cfg.train.seed)  # identical initial weights on every rank
        self.task = build_task(cfg)
        model = self.task.build_model()
        self.peak_lr = cfg.optim.lr(cfg.train.global_batch)
        optimizer = build_optimizer(model, self.peak_lr, cfg.optim.weight_decay, tuple(cfg.optim.betas))
        ds_config = build_ds_config(cfg, self.ctx.world_size)
        resume_point = self._resume_point()
        if resume_point is not None and resume_point.world_size not in (None, self.ctx.world_size):
            print(f"resuming a {resume_point.world_size}-rank checkpoint on {self.ctx.world_size} ranks: "
                  "loading its universal form", flush=True)  # fmt: skip
            resume_point = checkpoint.ensure_universal(resume_point, self.ctx.rank)
            ds_config["checkpoint"] = {"load_universal": True}
        self.engine, self.optimizer, _, _ = deepspeed.initialize(
            model=model, optimizer=optimizer, config=ds_config
        )
        if cfg.train.compile:
            self.engine.compile()
        self.state = self._load(resume_point)
        if self.ctx.is_main:
            info = run_info(cfg, self.ctx.world_size, self.accum, ds_config, self.ctx.device)
            info = with_start_history(info, self.out_dir, self.state.step)
            print(
                f"attention: {info['attention']}, world size {self.ctx.world_size}, accumulation {self.accum}",
                flush=True,
            )
            save_resolved_config(cfg, self.out_dir, info)
        self.train_loader, self.val_loader = self._build_loaders()
        self.monitor = RunMonitor(
            self.out_dir, self.ctx.is_main, cfg.train.steps, self.state.step, cfg.log.progress
        )
        self.monitor.text("config", "```\n" + json.dumps(cfg.to_dict(), indent=2) + "\n```")
        self.flops_per_sample = self.task.flops_per_sample()
        self.peak_flops = cfg.log.peak_flops or _device_peak_flops(self.ctx.device, cfg.train.precision)
        self.matmul_ceiling = _matmul_ceiling(self.ctx.device, self.dtype)

    def _build_loaders(self):
        from xray_pretrain.data.loader import build_train_loader, build_val_loader

        cfg, ctx = self.cfg, self.ctx
        common = dict(
            image_size=cfg.model.image_hw(),
            micro_batch=cfg.train.micro_batch,
            rank=ctx.rank,
            world_size=ctx.world_size,
        )
        train_loader = build_train_loader(
            cfg.data,
            accum_steps=self.accum,
            seed=cfg.train.seed,
            start_position=self.state.samples_seen,
            device=ctx.device.type,
            **common,
        )
        return train_loader, build_val_loader(cfg.data, device=ctx.device.type, **common)

    def _resume_point(self) -> checkpoint.ResumePoint | None:
        resume = self.cfg.checkpoint.resume
        if resume == "none":
            return None
        if resume == "auto" and not checkpoint.complete_tags(self.ckpt_dir):
            return None  # nothing to resume yet: a fresh start, as a requeued job expects
        return checkpoint.read_resume_point(self.ckpt_dir if resume == "auto" else Path(resume))

    def _load(self, point: checkpoint.ResumePoint | None) -> TrainState:
        if point is None:
            return TrainState()
        client = checkpoint.load(self.engine, point.root, point.tag)
        return TrainState(
            step=int(client["step"]),
            samples_seen=int(client["samples_seen"]),
            first_loss=client.get("first_loss"),
            last_loss=client.get("last_loss"),
        )

    # ---- the loop --------------------------------------------------------------------------------
    def run(self) -> dict:
        cfg, state = self.cfg, self.state
        batches = iter(self.train_loader)
        last_val: dict = {}
        image_path = None
        stop = False
        while state.step < cfg.train.steps:
            result = self._train_step(batches)
            state.step += 1
            state.samples_seen += cfg.train.global_batch
            done = state.step == cfg.train.steps
            if state.step % cfg.log.every == 0 or state.step == 1 or done:
                self._log_step(result)
            if state.step % cfg.log.val_every == 0 or done:
                last_val = self._validate()
            if state.step % cfg.log.image_every == 0 or done:
                image_path = self._preview() or image_path
            stop = not done and preempt.agreed_to_stop(self.ctx.device)  # same answer on every rank
            if state.step % cfg.checkpoint.every == 0 or done or stop:
                self._save_checkpoint()
            if stop:
                break
        return {
            "preempted": stop,
            "world_size": self.ctx.world_size,
            "accum_steps": self.accum,
            "backend": self.train_loader.backend,
            "steps": state.step,
            "samples_seen": state.samples_seen,
            "first_loss": state.first_loss,
            "last_loss": state.last_loss,
            "checkpoint_dir": str(self.ckpt_dir),
            "tensorboard_dir": str(self.monitor.tb_dir),
            "reconstruction_image": str(image_path) if image_path else None,
            **last_val,
        }

    def _train_step(self, batches) -> StepResult:
        """One optimizer step: `accum` micro-batches through forward/backward, then DeepSpeed's step."""
        cfg, step = self.cfg, self.state.step
        lr = lr_at(
            step,
            peak_lr=self.peak_lr,
            warmup_steps=cfg.optim.warmup_steps,
            total_steps=cfg.train.steps,
            min_lr=cfg.optim.min_lr,
        )
        set_lr(self.optimizer, lr)
        torch.manual_seed(cfg.train.seed * 1_000_003 + step * 4099 + self.ctx.rank)
        t_start = time.perf_counter()
        wait_s, loss_sum, task_logs = 0.0, torch.zeros((), device=self.ctx.device), {}
        for _ in range(self.accum):
            t0 = time.perf_counter()
            batch = next(batches)
            wait_s += time.perf_counter() - t0
            loss, task_logs = self.task.training_loss(self.engine, batch, self.ctx.device, self.dtype)
            self.engine.backward(loss)
            self.engine.step()  # DeepSpeed steps the optimizer at the accumulation boundary only
            loss_sum += loss.detach().float()
        return StepResult(loss_sum, task_logs, time.perf_counter() - t_start, wait_s)

    def _log_step(self, result: StepResult) -> None:
        cfg, state = self.cfg, self.state
        loss_mean, wait_mean = all_reduce_mean(
            [float(result.loss_sum) / self.accum, result.data_wait_s], self.ctx.device
        )
        state.first_loss = loss_mean if state.first_loss is None else state.first_loss
        state.last_loss = loss_mean
        scalars = {
            "train/loss": loss_mean,
            "train/lr": self.optimizer.param_groups[0]["lr"],
            "train/grad_norm": _grad_norm(self.engine),
            "perf/images_per_s": cfg.train.global_batch / result.step_s,
            "perf/data_wait_s": wait_mean,
            "perf/step_s": result.step_s,
            **{f"train/{k}": float(v) for k, v in result.task_logs.items()},
        }
        if self.flops_per_sample:
            flops_per_device_step = self.flops_per_sample * cfg.train.global_batch / self.ctx.world_size
            scalars["perf/tflops_per_device"] = flops_per_device_step / result.step_s / 1e12
            scalars["perf/mfu"] = mfu(flops_per_device_step, result.step_s, self.peak_flops)
            scalars["perf/matmul_ceiling_fraction"] = mfu(
                flops_per_device_step, result.step_s, self.matmul_ceiling
            )
        if self.ctx.device.type == "cuda":
            scalars["perf/peak_mem_gib"] = torch.cuda.max_memory_allocated() / 2**30
        self.monitor.scalars(state.step, scalars)
        self.monitor.progress(state.step, {"loss": loss_mean, "img/s": scalars["perf/images_per_s"]})

    def _validate(self) -> dict:
        metrics = self.task.evaluate(self.engine, self.val_loader, self.ctx.device, self.dtype)
        self.monitor.scalars(
            self.state.step, {f"val/{k.removeprefix('val_')}": v for k, v in metrics.items()}
        )
        return metrics

    def _preview(self) -> Path | None:
        grid = self.task.preview_image(
            self.engine, self.val_loader, self.ctx.device, self.dtype, num_images=self.cfg.log.num_images
        )
        return None if grid is None else self.monitor.image(self.state.step, "val/reconstruction", grid)

    def _save_checkpoint(self) -> None:
        state, cfg = self.state, self.cfg
        client = {
            "step": state.step,
            "samples_seen": state.samples_seen,
            "world_size": self.ctx.world_size,
            "first_loss": state.first_loss,
            "last_loss": state.last_loss,
            "rng": checkpoint.rng_state(),
        }
        checkpoint.save(
            self.engine,
            self.ckpt_dir,
            state.step,
            client,
            cfg.to_dict(),
            self.ctx.rank,
            cfg.checkpoint.keep_last,
        )


def _grad_norm(engine) -> float:
    norm = engine.get_global_grad_norm()
    return float("nan") if norm is None else float(norm)


def _matmul_ceiling(device: torch.device, dtype: torch.dtype) -> float:
    """Measured large-matmul FLOP/s of this device (GPUs only: a CPU measurement would cost seconds
    and say little); MFU against it separates kernel efficiency from the datasheet's optimism."""
    if device.type != "cuda":
        return float("nan")
    from xray_pretrain.models import measure_matmul_tflops

    return measure_matmul_tflops(device, dtype) * 1e12


def _device_peak_flops(device: torch.device, precision: str) -> float:
    from xray_pretrain.models import device_peak_flops

    return float(device_peak_flops(device, precision))
