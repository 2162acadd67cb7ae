"""One DeepSpeed training loop for every task.

The loop owns what every task shares: ZeRO, precision, accumulation toward a fixed global batch,
the LR schedule (with each parameter group's LR scale), checkpoint/resume, weights-only init,
validation, model selection and the final test, image cadence, throughput and MFU. What is specific
to a task (its model, parameter groups, loss, metrics) comes from `xray_pretrain.tasks`.

Set-up order: resume point (the task takes back its inference state) -> loaders (the task sees the label names) -> steps from epochs ->
model (+ `init.weights`) -> optimizer -> DeepSpeed -> state (weights, optimizer, data position,
RNG, best-so-far).

Reproducibility: data order, augmentation and masking noise depend only on (seed, global sample
position), so a resumed run replays exactly what an uninterrupted one would have done, also on
another number of ranks. The torch RNG is still reseeded from (seed, step, rank) at every step for
whatever else a task draws.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import dataclass
from pathlib import Path

import torch

from xray_pretrain.collectives import all_gather_objects, all_reduce_mean
from xray_pretrain.config import RunConfig, save_resolved_config
from xray_pretrain.data.badsamples import TooManySkipped, check_eval_skips, skipped_metrics
from xray_pretrain.data.order import ORDER_VERSION
from xray_pretrain.engine import checkpoint, init_weights, preempt
from xray_pretrain.engine.dist import DistContext, init_distributed, release_distributed
from xray_pretrain.engine.ds_config import build_ds_config
from xray_pretrain.engine.health import Health
from xray_pretrain.engine.monitor import RunMonitor
from xray_pretrain.engine.optim import build_optimizer, lr_at, set_lr
from xray_pretrain.engine.peers import PeerWatch
from xray_pretrain.engine.runinfo import run_info, with_start_history
from xray_pretrain.engine.selection import Selection
from xray_pretrain.models import mfu
from xray_pretrain.tasks import DataInfo, build_task

METRICS_NAME = "metrics.json"


@dataclass
class TrainState:
    step: int = 0  # optimizer steps done
    samples_seen: int = 0  # global data position (sum over ranks)
    first_loss: float | None = None
    last_loss: float | None = None
    run_id: str = ""  # this run's history (kept on resume): checkpoint pruning touches only its own


@dataclass
class StepResult:
    loss_sum: torch.Tensor  # summed over micro-steps, on the device (no host sync per micro-step)
    task_logs: dict
    step_s: float
    data_wait_s: float


def train(cfg: RunConfig) -> dict:
    """Train `cfg.task` for `cfg.train.steps` optimizer steps; returns a summary (rank 0's view).
    A lost rank or launcher ends the run with a message naming it (engine/peers.py)."""
    ctx = init_distributed(cfg.train.dist_timeout_s)
    try:
        with PeerWatch(ctx, cfg.train.dist_timeout_s) as watch:
            trainer = Trainer(cfg, ctx)
            watch.follow(lambda: trainer.state.step)
            try:
                return trainer.run()
            finally:
                trainer.monitor.close()
    finally:
        release_distributed(ctx)


class Trainer:
    def __init__(self, cfg: RunConfig, ctx: DistContext):
        self.cfg = cfg
        self.ctx = ctx
        if cfg.train.precision == "fp16" and self.ctx.device.type != "cuda":
            raise ValueError(
                "train.precision=fp16 needs a GPU (DeepSpeed's CPU accelerator has no fp16): use bf16 or fp32"
            )
        self.dtype = cfg.train.dtype
        self.accum = cfg.train.accum_steps(self.ctx.world_size)
        self.out_dir = Path(cfg.log.out_dir)
        self.ckpt_dir = self.out_dir / "checkpoints"
        self.task = build_task(cfg)
        resume_point = self._resume_point()
        if resume_point is not None:  # what the task fitted to the data (e.g. a tokenizer) is kept
            self.task.restore_inference_state(
                checkpoint.read_inference_info(resume_point.root, resume_point.tag)
            )
        init_source = self._init_source()
        if resume_point is not None:  # after init.weights gave the model its shape
            checkpoint.check_resume_model(cfg, resume_point.root / resume_point.tag)
        self.train_loader, self.val_loader = self._build_loaders(resume_point)
        self.data_info = self._data_info()
        self.task.bind_data(self.data_info)
        if cfg.train.epochs is not None:
            cfg.train.steps = max(1, math.ceil(cfg.train.epochs * self.train_loader.num_samples_per_epoch
                                               / cfg.train.global_batch))  # fmt: skip
        model, init_record = self._build_model(init_source, resume_point)
        del init_source
        self.engine, self.optimizer, ds_config, resume_point = self._start_engine(model, resume_point)
        if cfg.train.compile:
            self.engine.compile()
        self.selection = Selection(*self.task.selection) if self.task.selection else None
        self.health = Health(self.guarded_optimizer, cfg.train.max_bad_steps, cfg.data.max_bad_fraction)
        self.guarded_optimizer.device = self.ctx.device
        self.state = self._load(resume_point)
        if self.ctx.is_main:
            info = run_info(cfg, self.ctx.world_size, self.accum, ds_config, self.ctx.device)
            info["init_weights"] = init_record
            info = with_start_history(info, self.out_dir, self.state.step)
            print(
                f"attention: {info['attention']}, world size {self.ctx.world_size}, accumulation {self.accum}",
                flush=True,
            )
            save_resolved_config(cfg, self.out_dir, info)
        self.monitor = RunMonitor(
            self.out_dir, self.ctx.is_main, cfg.train.steps, self.state.step, cfg.log.progress
        )
        self.monitor.text("config", "```\n" + json.dumps(cfg.to_dict(), indent=2) + "\n```")
        self.flops_per_sample = self.task.flops_per_sample()
        self.peak_flops = cfg.log.peak_flops or _device_peak_flops(self.ctx.device, cfg.train.precision)
        self.matmul_ceiling = _matmul_ceiling(self.ctx.device, self.dtype)

    def _build_model(self, init_source, resume_point) -> tuple[torch.nn.Module, dict | None]:
        """The task's model, identical on every rank; `init.weights` loaded unless resuming (a resume
        brings its own weights). Returns (model, the init record or None)."""
        model = init_weights.initial_model(self.task, self.cfg.train.seed)
        if init_source is None or resume_point is not None:
            return model, None
        record = init_weights.initialize(
            model, init_source, self.task, self.out_dir if self.ctx.is_main else None
        )
        return model, record

    def _start_engine(self, model, resume_point):
        """DeepSpeed around the model and the task's parameter groups. A checkpoint of another world
        size is resumed through its universal form. Returns (engine, optimizer, ds_config, point)."""
        import deepspeed

        cfg = self.cfg
        self.peak_lr = cfg.optim.lr(cfg.train.global_batch)
        groups = self.task.param_groups(model, cfg.optim.weight_decay)
        optimizer = build_optimizer(groups, self.peak_lr, tuple(cfg.optim.betas))
        self.guarded_optimizer = optimizer  # DeepSpeed wraps it; it skips non-finite steps (health.py)
        ds_config = build_ds_config(cfg, self.ctx.world_size)
        if resume_point is not None and resume_point.world_size not in (None, self.ctx.world_size):
            print(f"resuming a {resume_point.world_size}-rank checkpoint on {self.ctx.world_size} ranks: "
                  "loading its universal form", flush=True)  # fmt: skip
            resume_point = checkpoint.ensure_universal(resume_point, self.ctx.rank)
            ds_config["checkpoint"] = {"load_universal": True}
        engine, optimizer, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, config=ds_config)
        return engine, optimizer, ds_config, resume_point

    def _build_loaders(self, resume_point: checkpoint.ResumePoint | None):
        from xray_pretrain.data.loader import build_train_loader, build_val_loader

        cfg, ctx = self.cfg, self.ctx
        train_loader = build_train_loader(
            cfg.data,
            accum_steps=self.accum,
            seed=cfg.train.seed,
            start_position=resume_point.samples_seen if resume_point else 0,
            device=ctx.device.type,
            select=self.task.select_train_samples,
            **self._loader_args(),
        )
        val_loader = build_val_loader(
            cfg.data, device=ctx.device.type, whole_split=self.task.val_whole_split, **self._loader_args()
        )
        return train_loader, val_loader

    def _loader_args(self) -> dict:
        return dict(
            image_size=self.cfg.model.image_hw(),
            micro_batch=self.cfg.train.micro_batch,
            rank=self.ctx.rank,
            world_size=self.ctx.world_size,
            reports=self.cfg.loader_reports(),  # report text (and view pairs) when the task reads them
        )

    def _data_info(self) -> DataInfo:
        loader = self.train_loader
        return DataInfo(
            label_names=list(loader.label_names),
            image_size=tuple(self.cfg.model.image_hw()),
            intensity=loader.intensity,
            conversion=loader.conversion,
        )

    def _init_source(self) -> init_weights.InitSource | None:
        """The `init.weights` source, its architecture adopted into the model config (also when
        resuming: the checkpoint holds that architecture)."""
        if self.cfg.init.weights == "none":
            return None
        source = init_weights.open_source(self.cfg.init.weights)
        init_weights.adopt_architecture(self.cfg.model, source.architecture, self.cfg.init.weights)
        self.cfg.model.validate()
        return source

    def inference_info(self, fitted: dict) -> dict:
        """What a checkpoint needs for inference without the shards (written as inference.json)."""
        info = self.data_info
        return {
            "task": self.cfg.task,
            "image_size": list(info.image_size),
            "intensity": {"mean": info.intensity[0]["mean"], "std": info.intensity[0]["std"]},
            "image_format": info.intensity[0]["image_format"],
            "conversion": info.conversion,
            "intensity_per_folder": info.intensity,
            **self.task.inference_state(fitted),
        }

    def _resume_point(self) -> checkpoint.ResumePoint | None:
        resume = self.cfg.checkpoint.resume
        if resume == "none":
            return None
        if resume == "auto" and not checkpoint.complete_tags(self.ckpt_dir):
            return None  # nothing to resume yet: a fresh start, as a requeued job expects
        return checkpoint.read_resume_point(
            self.ckpt_dir if resume == "auto" else Path(resume), self.ctx.rank, self.ctx.world_size
        )

    def _load(self, point: checkpoint.ResumePoint | None) -> TrainState:
        if point is None:
            return TrainState(run_id=checkpoint.new_run_id())
        client = checkpoint.load(self.engine, point.root, point.tag)
        if "rng" in client:
            checkpoint.restore_rng_state(client["rng"])
        if self.selection is not None and client.get("selection"):
            self.selection = Selection.from_state(client["selection"])
        self.health.restore(client)
        written_with = client.get("data_order", "older than " + ORDER_VERSION)
        if written_with != ORDER_VERSION and self.ctx.is_main:
            print(
                f"checkpoint {point.tag} was written with the data order {written_with}: resuming at sample "
                f"{point.samples_seen} of the order {ORDER_VERSION}, so some samples of the current epoch are "
                "seen twice or not at all (later epochs are exact)",
                flush=True,
            )
        assert int(client["samples_seen"]) == point.samples_seen, (
            "complete.json disagrees with the checkpoint"
        )
        return TrainState(
            step=int(client["step"]),
            samples_seen=int(client["samples_seen"]),
            first_loss=client.get("first_loss"),
            last_loss=client.get("last_loss"),
            run_id=client.get("run_id", ""),
        )

    # ---- the loop --------------------------------------------------------------------------------
    def run(self) -> dict:
        cfg, state = self.cfg, self.state
        batches = iter(self.train_loader)
        last_val: dict = {}
        image_path = None
        stop = False
        unhealthy = None  # why the run stopped early (non-finite steps, corrupt samples), else None
        while state.step < cfg.train.steps:
            result = self._train_step(batches)
            state.step += 1
            state.samples_seen += cfg.train.global_batch
            unhealthy = self._check_health()
            if unhealthy:
                self._log_step(result)
                break
            done = state.step == cfg.train.steps
            if state.step % cfg.log.every == 0 or state.step == 1 or done:
                self._log_step(result)
            if state.step % cfg.log.val_every == 0 or done:
                try:
                    last_val = self._validate()
                except TooManySkipped as error:  # selecting on a shrunken split: stop, as for training's
                    unhealthy = str(error)
                    break
            if state.step % cfg.log.image_every == 0 or done:
                image_path = self._preview() or image_path
            stop = not done and preempt.agreed_to_stop(self.ctx.device)  # same answer on every rank
            if state.step % cfg.checkpoint.every == 0 or done or stop:
                if not self.health.weights_finite(self.ctx.device):
                    unhealthy = f"the weights are not finite at step {state.step}: no checkpoint written"
                    break
                if self.health.num_bad_in_row and not (done or stop):  # a diverging run keeps `latest`
                    print(f"step {state.step}: checkpoint skipped (the step was non-finite)", flush=True)
                else:
                    self._save_checkpoint()
            if stop:
                break
        summary = {
            "preempted": stop,
            "world_size": self.ctx.world_size,
            "accum_steps": self.accum,
            "backend": self.train_loader.backend,
            "steps": state.step,
            "samples_seen": state.samples_seen,
            "first_loss": state.first_loss,
            "last_loss": state.last_loss,
            **self.health.state(),
            "stopped": unhealthy,
            "checkpoint_dir": str(self.ckpt_dir),
            "tensorboard_dir": str(self.monitor.tb_dir),
            **last_val,
        }
        if self.task.preview_name:
            summary[f"{self.task.preview_name}_image"] = str(image_path) if image_path else None
        if self.selection is not None and not stop and not unhealthy:  # the test split: once, at the end
            summary["best_step"] = self.selection.best_step
            try:
                summary["test"] = self._test_best()
            except TooManySkipped as error:  # no metrics.json: they would not be the test split's
                summary["test"], summary["stopped"] = None, str(error)
        return summary

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
        self.lr = lr  # the schedule's value; groups train at lr * their lr_scale
        self.task.begin_step(step, cfg.train.steps)
        torch.manual_seed(cfg.train.seed * 1_000_003 + step * 4099 + self.ctx.rank)
        t_start = time.perf_counter()
        wait_s, loss_sum, task_logs = 0.0, torch.zeros((), device=self.ctx.device), {}
        for _ in range(self.accum):
            t0 = time.perf_counter()
            batch = next(batches)
            wait_s += time.perf_counter() - t0
            loss, task_logs = self.task.training_loss(self.engine, batch, self.ctx.device, self.dtype)
            self.health.note_micro_batch(batch, loss)
            self.engine.backward(loss)
            self.engine.step()  # DeepSpeed steps the optimizer at the accumulation boundary only
            loss_sum += loss.detach().float()
        return StepResult(loss_sum, task_logs, time.perf_counter() - t_start, wait_s)

    def _check_health(self) -> str | None:
        """Agree with all ranks on this step's health (health.py); log skips; why to stop, or None."""
        state = self.state
        bad_step, num_new_bad = self.health.end_step(self.engine, self.train_loader.bad.take_new())
        if bad_step or num_new_bad:  # at once; otherwise with the other scalars (`_log_step`)
            self.monitor.scalars(state.step, self.health.scalars())
        if bad_step:
            print(f"step {state.step}: non-finite loss or gradients, step skipped "
                  f"({self.health.num_bad_in_row} in a row)", flush=True)  # fmt: skip
        return self.health.stop_message(
            state.step, state.samples_seen, self.train_loader.num_samples_per_epoch, self.train_loader.bad.last,
            lambda: next(iter(checkpoint.complete_tags(self.ckpt_dir)[-1:]), None),
        )  # fmt: skip

    def _log_step(self, result: StepResult) -> None:
        cfg, state = self.cfg, self.state
        loss_mean, wait_mean = all_reduce_mean(
            [float(result.loss_sum) / self.accum, result.data_wait_s], self.ctx.device
        )
        state.first_loss = loss_mean if state.first_loss is None else state.first_loss
        state.last_loss = loss_mean
        scalars = {
            "train/loss": loss_mean,
            "train/lr": self.lr,
            "train/grad_norm": _grad_norm(self.engine),
            "perf/images_per_s": cfg.train.global_batch / result.step_s,
            "perf/data_wait_s": wait_mean,
            "perf/step_s": result.step_s,
            **self.health.scalars(),
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
        metrics = evaluate_reporting_skips(
            self.task, self.engine, self.val_loader, self.ctx.device, self.dtype,
            split=self.cfg.data.val_split, max_fraction=self.cfg.data.max_bad_fraction,
        )  # fmt: skip
        self.monitor.scalars(
            self.state.step,
            {f"val/{k.removeprefix('val_')}": v for k, v in metrics.items() if _is_number(v)},
        )
        if self.selection is not None and self.selection.improves(metrics):
            self.selection.update(self.state.step, metrics, self.task.fitted_state())
            self._save_best()
        return metrics

    def _preview(self) -> Path | None:
        if not self.task.preview_name:
            return None
        grid = self.task.preview_image(
            self.engine, self.val_loader, self.ctx.device, self.dtype, num_images=self.cfg.log.num_images
        )
        return (
            None
            if grid is None
            else self.monitor.image(self.state.step, f"val/{self.task.preview_name}", grid)
        )

    def _client_state(self) -> dict:
        state = self.state
        return {
            "step": state.step,
            "samples_seen": state.samples_seen,
            "data_order": ORDER_VERSION,
            "world_size": self.ctx.world_size,
            "first_loss": state.first_loss,
            "last_loss": state.last_loss,
            "run_id": state.run_id,
            "rng": checkpoint.rng_state(),
            **self.health.state(),
            "selection": self.selection.state() if self.selection else None,
        }

    def _save_best(self) -> None:
        checkpoint.save_best(
            self.engine, self.ckpt_dir, self.state.step, self._client_state(), self.cfg.to_dict(),
            self.ctx.rank, self.inference_info(self.selection.best_fitted),
        )  # fmt: skip

    def _test_best(self) -> dict | None:
        """Evaluate the test split once, on `checkpoints/best`, with what its validation fitted;
        rank 0 writes metrics.json. None (with a warning) when there is no test split."""
        from xray_pretrain.data.loader import build_val_loader

        test_loader = build_val_loader(
            self.cfg.data, device=self.ctx.device.type, whole_split=True, split="test", **self._loader_args()
        )
        if test_loader.num_samples == 0:
            print(
                f"warning: no 'test' split in {self.cfg.data.resolved_val_shards}: no test metrics",
                flush=True,
            )
            return None
        checkpoint.load(self.engine, self.ckpt_dir, checkpoint.BEST_TAG)
        metrics = evaluate_reporting_skips(
            self.task,
            self.engine,
            test_loader,
            self.ctx.device,
            self.dtype,
            split="test",
            max_fraction=self.cfg.data.max_bad_fraction,
            fitted=self.selection.best_fitted,
        )
        test = {k.replace("val_", "test_", 1): v for k, v in metrics.items()}
        if self.ctx.is_main:
            record = {
                "checkpoint": str(self.ckpt_dir / checkpoint.BEST_TAG),
                "best_step": self.selection.best_step,
                "selected_on": f"{self.cfg.data.val_split} {self.selection.metric} ({self.selection.mode})",
                "val": self.selection.best_metrics,
                "test": test,
            }
            (self.out_dir / METRICS_NAME).write_text(json.dumps(record, indent=2))
        return test

    def _save_checkpoint(self) -> None:
        cfg = self.cfg
        checkpoint.save(
            self.engine,
            self.ckpt_dir,
            self.state.step,
            self._client_state(),
            cfg.to_dict(),
            self.ctx.rank,
            cfg.checkpoint.keep_last,
            self.inference_info(self.task.fitted_state()),
        )


def evaluate_reporting_skips(
    task, model, loader, device, dtype, *, split: str, max_fraction: float, fitted: dict | None = None
) -> dict:
    """`task.evaluate` of one pass over `loader` (every rank), with the corrupt samples it skipped on
    any rank (`val_num_skipped`, `val_skipped`: shard, key, reason): left out of the metrics, never
    silently. More than `max_fraction` of the split raises `badsamples.TooManySkipped` on every rank
    (they all gathered the same records)."""
    metrics = task.evaluate(model, loader, device, dtype, fitted=fitted)
    skipped = skipped_metrics(record for part in all_gather_objects(loader.skipped) for record in part)
    check_eval_skips(skipped, loader.num_samples, max_fraction, split)
    return {**metrics, **{f"val_{name}": value for name, value in skipped.items()}}


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)


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
