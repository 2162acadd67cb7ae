"""A run's health, agreed by all ranks every step: non-finite steps and corrupt samples.

Non-finite loss or gradients: the step is skipped. `GuardedAdamW` (the optimizer DeepSpeed wraps)
leaves parameters and its state untouched when this rank saw a non-finite loss in the step or its
gradients are not finite, and all ranks agree (one MAX all-reduce inside the step: DeepSpeed calls
the inner optimizer the same number of times on every rank). DeepSpeed may also skip on its own
(its overflow check); either way the step counts as bad. `max_bad_steps` bad steps in a row stop
the run before anything is saved, naming the batch's sample keys; a checkpoint is never written
from non-finite weights.

Corrupt samples: the train loader counts this rank's skips (`data.badsamples`); here they are
summed over ranks and the run stops above `data.max_bad_fraction`.

Both stops end the run with `stop` set: the summary says why, the command exits non-zero.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch

from xray_pretrain.collectives import all_gather_objects, all_reduce_sum
from xray_pretrain.data import badsamples


def _any_rank(flag_t: torch.Tensor, device: torch.device | None = None) -> bool:
    """True on every rank when `flag_t` (a 0-d tensor) is non-zero on any rank; `device`: where the
    process group's backend reduces (CPU-offloaded optimizer state lives elsewhere)."""
    flag_t = flag_t.float().reshape(1).to(device or flag_t.device)
    if torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1:
        torch.distributed.all_reduce(flag_t, op=torch.distributed.ReduceOp.MAX)
    return bool(flag_t.item())


class GuardedAdamW(torch.optim.AdamW):
    """AdamW that skips the whole update (parameters and moments unchanged) when any rank saw a
    non-finite loss (`loss_bad_t`, set by the trainer without a host sync) or non-finite gradients."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.loss_bad_t: torch.Tensor | None = None  # 0-d bool on the loss's device, or None
        self.skipped = False  # some call of this optimizer step skipped (reset by `Health.end_step`)
        self.device: torch.device | None = None  # where the all-reduce runs (set by the trainer)

    def step(self, closure=None):
        grads = [p.grad for group in self.param_groups for p in group["params"] if p.grad is not None]
        bad_t = ~torch.stack([torch.isfinite(g).all() for g in grads]).all() if grads else torch.tensor(False)
        if self.loss_bad_t is not None:
            bad_t = bad_t | self.loss_bad_t.to(bad_t.device)
        if _any_rank(bad_t, self.device) or self.skipped:  # the collective first, on every rank
            self.skipped = True
            return None
        return super().step(closure)


class Health:
    """Per-step bookkeeping of bad steps and corrupt samples (every rank; one collective per step)."""

    def __init__(self, optimizer: GuardedAdamW, max_bad_steps: int, max_bad_fraction: float):
        self.optimizer, self.max_bad_steps, self.max_bad_fraction = optimizer, max_bad_steps, max_bad_fraction
        self.num_bad_steps = 0  # whole run (restored on resume)
        self.num_bad_in_row = 0
        self.num_bad_samples = 0  # whole run, all ranks (restored on resume)
        self.keys: list[str] = []  # this rank's sample keys of the current step

    def note_micro_batch(self, batch: dict, loss: torch.Tensor) -> None:
        """Called after each forward: remembers the keys, flags a non-finite loss (no host sync)."""
        if not self.keys:
            self.optimizer.loss_bad_t = None
        self.keys += list(batch["key"])
        bad_t = ~torch.isfinite(loss.detach())
        prev = self.optimizer.loss_bad_t
        self.optimizer.loss_bad_t = bad_t if prev is None else prev | bad_t

    def end_step(self, engine, num_new_bad_samples: int) -> tuple[bool, int]:
        """After the optimizer step: (was it bad, corrupt samples this step over all ranks)."""
        bad = self.optimizer.skipped or not engine.was_step_applied()  # DeepSpeed's own overflow skip too
        bad_sum, num_new = all_reduce_sum([float(bad), float(num_new_bad_samples)], engine.device)
        bad = bad_sum > 0
        self.optimizer.skipped = False
        self.optimizer.loss_bad_t = None
        self.num_bad_steps += int(bad)
        self.num_bad_in_row = self.num_bad_in_row + 1 if bad else 0
        self.num_bad_samples += int(num_new)
        return bad, int(num_new)

    def stop_message(self, step: int, samples_read: int, samples_per_epoch: int, last_bad: dict | None,
                     last_good_checkpoint: Callable[[], str | None]) -> str | None:  # fmt: skip
        """Why the run must stop now (the same text on every rank), or None. Collective when stopping.
        `last_bad`: this rank's latest corrupt-sample record; `last_good_checkpoint()`: its tag."""
        if self.num_bad_in_row >= self.max_bad_steps:
            keys = sorted(k for part in all_gather_objects(self.keys) for k in part)
            self.keys = []
            return (
                f"{self.num_bad_in_row} steps in a row (to step {step}) had a non-finite loss or gradients "
                f"and were skipped (train.max_bad_steps={self.max_bad_steps}); the last batch's sample keys: "
                f"{', '.join(keys)}. Last good checkpoint: {last_good_checkpoint() or 'none yet'} (kept). "
                "Lower optim.base_lr or check these samples"
            )
        self.keys = []
        if badsamples.exceeded(self.num_bad_samples, samples_read, samples_per_epoch, self.max_bad_fraction):
            named = [r for r in all_gather_objects(last_bad) if r]
            return badsamples.stop_message(
                self.num_bad_samples, samples_read, self.max_bad_fraction, named[-1] if named else None
            )
        return None

    def weights_finite(self, device: torch.device) -> bool:
        """True on every rank when every rank's optimizer-held weights (fp32 masters or the ZeRO
        partition) are finite."""
        params = [p for group in self.optimizer.param_groups for p in group["params"]]
        bad_t = torch.zeros((), dtype=torch.bool, device=device)
        if params:
            bad_t = ~torch.stack([torch.isfinite(p.detach()).all() for p in params]).all().to(device)
        return not _any_rank(bad_t, device)

    def scalars(self) -> dict[str, int]:
        """TensorBoard counters (whole run, all ranks)."""
        return {"train/bad_steps": self.num_bad_steps, "data/bad_samples": self.num_bad_samples}

    def state(self) -> dict:
        return {"num_bad_steps": self.num_bad_steps, "num_bad_samples": self.num_bad_samples}

    def restore(self, client: dict) -> None:
        self.num_bad_steps = int(client.get("num_bad_steps", 0))
        self.num_bad_samples = int(client.get("num_bad_samples", 0))


def json_safe(value):
    """`value` with every non-finite float replaced by None (JSON has no NaN or inf)."""
    if isinstance(value, float) and not math.isfinite(value):
        return None
    if isinstance(value, dict):
        return {k: json_safe(v) for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [json_safe(v) for v in value]
    return value


def non_finite_fields(value, prefix: str = "") -> list[str]:
    """Dotted names of the non-finite floats in a summary (reported beside the nulls)."""
    if isinstance(value, float) and not math.isfinite(value):
        return [prefix]
    if isinstance(value, dict):
        return [
            name for k, v in value.items() for name in non_finite_fields(v, f"{prefix}.{k}" if prefix else k)
        ]
    return []
