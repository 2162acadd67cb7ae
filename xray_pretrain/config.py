"""One typed config tree for every run: defaults in dataclasses, YAML overlays, CLI overrides.

    cfg = load_config("tiny_cpu", ["train.steps=50", "data.shards=[runs/shards]"])

A config is a YAML file's path or the name of one shipped in the package (`xray_pretrain/configs/`,
listed by `packaged_configs()`), so an installed wheel runs from any working directory.

A YAML file holds only differences from the defaults. Each `section.key=value` override is parsed as
YAML (so `[1,2]`, `true`, `3e-4` work) and type-checked against the dataclass field. Unknown keys are
an error naming the valid ones. `validate()` runs every section's checks before any process is
spawned. Each component owns its section's dataclass (`models.MAEConfig`, `data.DataConfig`, ...);
this module only assembles them.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib.resources
import json
import math
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

import torch
import yaml

from xray_pretrain.data.config import DataConfig
from xray_pretrain.data.reports import ReportSpec
from xray_pretrain.models import MAEConfig, MaskConfig
from xray_pretrain.tasks.classify_config import ClassifyConfig
from xray_pretrain.tasks.report_config import ReportConfig

# train.precision -> the dtype the model computes in (fp16 with DeepSpeed's dynamic loss scaling)
PRECISION_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
PRECISIONS = tuple(PRECISION_DTYPES)
TASKS = ("pretrain", "classify", "report")
# Each task's own section: set while another task runs, it would silently do nothing.
TASK_SECTIONS = {"classify": "classify", "report": "report"}


@dataclass
class OptimConfig:
    base_lr: float = 1.5e-4  # MAE's rule: lr = base_lr * global_batch / 256
    weight_decay: float = 0.05  # never applied to norms, biases, pos/cls/mask tokens
    betas: list[float] = field(default_factory=lambda: [0.9, 0.95])
    warmup_steps: int = 40
    min_lr: float = 0.0
    clip_grad: float = 1.0  # 0 disables clipping

    def validate(self) -> None:
        numbers = {"base_lr": self.base_lr, "weight_decay": self.weight_decay, "min_lr": self.min_lr}
        numbers.update(clip_grad=self.clip_grad, **{f"betas[{i}]": b for i, b in enumerate(self.betas)})
        not_finite = [name for name, value in numbers.items() if not math.isfinite(value)]
        if not_finite:
            raise ValueError(f"optim.{', optim.'.join(not_finite)} must be finite numbers (got NaN or inf)")
        if self.base_lr <= 0:
            raise ValueError(f"optim.base_lr must be > 0, got {self.base_lr}")
        if len(self.betas) != 2 or not all(0 <= b < 1 for b in self.betas):
            raise ValueError(f"optim.betas must be two numbers in [0, 1), got {self.betas}")
        if self.warmup_steps < 0 or self.clip_grad < 0 or self.weight_decay < 0:
            raise ValueError("optim.warmup_steps, optim.clip_grad and optim.weight_decay must be >= 0")

    def lr(self, global_batch: int) -> float:
        return self.base_lr * global_batch / 256


@dataclass
class TrainConfig:
    global_batch: int = 4096  # fixed whatever the world size; accumulation adapts
    micro_batch: int = 32  # per rank per forward
    steps: int = 1000  # optimizer steps
    epochs: float | None = None  # if set: steps = ceil(epochs * training samples / global_batch)
    precision: str = "bf16"  # fp32 | bf16 | fp16 (dynamic loss scaling, for GPUs without bf16)
    zero_stage: int = 2
    ds_config: str | None = None  # default: the packaged configs/deepspeed/zero{zero_stage}.json
    seed: int = 0
    compile: bool = False  # torch.compile the model
    # Seconds a rank waits for a lost or stopped peer (a collective, a missing heartbeat) before it
    # stops with a message naming that rank (engine/peers.py). Long enough for the slowest legitimate
    # wait: a large checkpoint written while the other ranks wait in a barrier.
    dist_timeout_s: float = 600.0
    max_bad_steps: int = 5  # non-finite steps in a row (each skipped) before the run stops

    def validate(self) -> None:
        if not (math.isfinite(self.dist_timeout_s) and self.dist_timeout_s >= 1):
            raise ValueError(
                f"train.dist_timeout_s must be a number of seconds >= 1, got {self.dist_timeout_s}"
            )
        if self.precision not in PRECISIONS:
            raise ValueError(f"train.precision must be one of {PRECISIONS}, got {self.precision!r}")
        if self.zero_stage not in (0, 1, 2, 3):
            raise ValueError(f"train.zero_stage must be 0-3, got {self.zero_stage}")
        if self.max_bad_steps < 1:
            raise ValueError(f"train.max_bad_steps must be >= 1, got {self.max_bad_steps}")
        if min(self.global_batch, self.micro_batch, self.steps) < 1:
            raise ValueError("train.global_batch, train.micro_batch and train.steps must be >= 1")
        if self.epochs is not None and self.epochs <= 0:
            raise ValueError(f"train.epochs must be > 0 (or null to count train.steps), got {self.epochs}")
        if self.global_batch % self.micro_batch:
            raise ValueError(
                f"train.global_batch={self.global_batch} is not a multiple of train.micro_batch="
                f"{self.micro_batch}; pick sizes with global_batch = micro_batch * world_size * accumulation"
            )

    @property
    def dtype(self) -> torch.dtype:
        return PRECISION_DTYPES[self.precision]

    def accum_steps(self, world_size: int) -> int:
        """Gradient accumulation that keeps the global batch fixed at this world size."""
        per_step = self.micro_batch * world_size
        if self.global_batch % per_step:
            raise ValueError(
                f"train.global_batch={self.global_batch} is not divisible by micro_batch*world_size="
                f"{self.micro_batch}*{world_size}; change train.micro_batch or the number of ranks"
            )
        return self.global_batch // per_step


@dataclass
class CheckpointConfig:
    every: int = 500  # optimizer steps between checkpoints (and one at the end)
    keep_last: int = 3
    resume: str = "none"  # none | auto (latest in out_dir/checkpoints) | path to a checkpoint folder

    def validate(self) -> None:
        if self.every < 1 or self.keep_last < 1:
            raise ValueError("checkpoint.every and checkpoint.keep_last must be >= 1")


@dataclass
class LogConfig:
    out_dir: str = "runs/default"
    every: int = 10  # steps between scalar logs
    val_every: int = 100  # steps between validation runs (and one at the end)
    image_every: int = 200  # steps between reconstruction image grids
    num_images: int = 4  # samples in the reconstruction grid
    progress: bool = True  # tqdm bar on rank 0
    peak_flops: float | None = None  # device peak for MFU; None = look up the device

    def validate(self) -> None:
        if min(self.every, self.val_every, self.image_every) < 1:
            raise ValueError("log.every, log.val_every and log.image_every must be >= 1")


@dataclass
class InitConfig:
    """Weights-only initialization, separate from `checkpoint.resume` (which continues a run).

    weights: `none` (random init) or a folder: an `export`, a checkpoints folder (its latest), one
    step folder (or `best`), or a run folder (its checkpoints); any ZeRO stage. The encoder's
    architecture comes from that source (see `engine.init_weights`).
    """

    weights: str = "none"

    def validate(self) -> None:
        if not self.weights:
            raise ValueError("init.weights is empty: give a folder, or none for random init")


@dataclass
class RunConfig:
    task: str = "pretrain"
    model: MAEConfig = field(default_factory=MAEConfig)
    mask: MaskConfig = field(default_factory=MaskConfig)
    init: InitConfig = field(default_factory=InitConfig)
    classify: ClassifyConfig = field(default_factory=ClassifyConfig)
    report: ReportConfig = field(default_factory=ReportConfig)
    data: DataConfig = field(default_factory=DataConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    checkpoint: CheckpointConfig = field(default_factory=CheckpointConfig)
    log: LogConfig = field(default_factory=LogConfig)

    def validate(self, sections: tuple[str, ...] | None = None) -> None:
        """Check every section (or only `sections`, for a tool that reads just those)."""
        if self.task not in TASKS:
            raise ValueError(f"task must be one of {TASKS}, got {self.task!r}")
        for f in dataclasses.fields(self):
            section = getattr(self, f.name)
            if dataclasses.is_dataclass(section) and (sections is None or f.name in sections):
                section.validate()
        for task, section in TASK_SECTIONS.items():
            if (
                sections is None
                and self.task != task
                and getattr(self, section) != type(getattr(self, section))()
            ):
                raise ValueError(f"{section}.* is set but task={self.task}: set task={task} or drop them")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def loader_reports(self) -> ReportSpec | None:
        """What the loaders must carry besides images (their `reports` argument): for task=report,
        each item's text of report.section, over one image or a frontal + lateral pair
        (report.views); None for the other tasks."""
        if self.task != "report":
            return None
        return ReportSpec(self.report.section, self.report.views)


def load_config(
    path: str | Path | None = None,
    overrides: list[str] | tuple[str, ...] = (),
    sections: tuple[str, ...] | None = None,
) -> RunConfig:
    """Defaults <- YAML file <- `section.key=value` overrides, then validated (all, or `sections`)."""
    cfg = RunConfig()
    if path is not None:
        text, where = read_config_text(path)
        try:
            data = yaml.safe_load(text) or {}
        except yaml.YAMLError as err:
            raise ValueError(f"{where} is not valid YAML: {str(err).splitlines()[0]}") from None
        if not isinstance(data, dict):
            raise ValueError(f"{where}: expected a mapping of sections, got {type(data).__name__}")
        _merge(cfg, data, where=where)
    for item in overrides:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise ValueError(f"override {item!r} is not of the form section.key=value")
        try:
            value = yaml.safe_load(raw) if raw.strip() else None
        except yaml.YAMLError as err:
            raise ValueError(
                f"override {item!r}: the value is not valid YAML ({str(err).splitlines()[0]}); "
                "lists look like [a, b], strings with special characters go in quotes"
            ) from None
        set_value(cfg, key.strip(), value, where="command line")
    cfg.validate(sections)
    return cfg


def packaged_configs() -> dict[str, importlib.resources.abc.Traversable]:
    """Name -> file of every run config shipped inside the package (`xray_pretrain/configs/*.yaml`)."""
    folder = importlib.resources.files("xray_pretrain") / "configs"
    return {f.name.removesuffix(".yaml"): f for f in folder.iterdir() if f.name.endswith(".yaml")}


def read_config_text(path_or_name: str | Path) -> tuple[str, str]:
    """(YAML text, where it came from) for a config file path or a packaged config's name.

    A path that exists wins; otherwise `tiny_cpu`, `tiny_cpu.yaml` and `configs/tiny_cpu.yaml` all
    name the packaged file, so commands written against a checkout still work from an installed wheel.
    """
    path = Path(path_or_name)
    if path.is_file():
        return path.read_text(), str(path)
    packaged = packaged_configs()
    name = path.name.removesuffix(".yaml")
    if name in packaged and (len(path.parts) == 1 or path.parent.name == "configs"):
        return packaged[name].read_text(), f"{name} (packaged config)"
    raise ValueError(
        f"config {str(path_or_name)!r} is neither a file nor a packaged config name; "
        f"packaged: {', '.join(sorted(packaged))}"
    )


def config_from_dict(data: dict) -> RunConfig:
    """Rebuild a RunConfig from `RunConfig.to_dict()` output (e.g. a checkpoint's client state)."""
    cfg = RunConfig()
    _merge(cfg, data, where="saved config")
    cfg.validate()
    return cfg


def _merge(obj, data: dict, where: str, prefix: str = "") -> None:
    for key, value in data.items():
        dotted = f"{prefix}{key}"
        if isinstance(value, dict) and dataclasses.is_dataclass(getattr(obj, key, None)):
            _merge(getattr(obj, key), value, where, prefix=f"{dotted}.")
        else:
            set_value(obj, key, value, where, dotted=dotted)


def set_value(root, dotted_key: str, value, where: str, dotted: str | None = None) -> None:
    """Set `a.b.c` on a dataclass tree, checking the key exists and the value's type fits."""
    *parents, leaf = dotted_key.split(".")
    obj = root
    for part in parents:
        if not dataclasses.is_dataclass(obj) or not hasattr(obj, part):
            raise ValueError(f"{where}: unknown config section {dotted_key!r}")
        obj = getattr(obj, part)
    names = {f.name: f for f in dataclasses.fields(obj)}
    if leaf not in names:
        raise ValueError(
            f"{where}: unknown key {dotted or dotted_key!r}; valid keys here: {', '.join(names)}"
        )
    hint = typing.get_type_hints(type(obj))[leaf]
    setattr(obj, leaf, _coerce(value, hint, dotted or dotted_key, where))


def _coerce(value, hint, key: str, where: str):
    """Check `value` against a field's annotation; ints are accepted for floats and [x] for lists."""
    origin = typing.get_origin(hint)
    if origin in (typing.Union, types.UnionType):
        options = typing.get_args(hint)
        if value is None and type(None) in options:
            return None
        errors = []
        for option in options:
            if option is type(None):
                continue
            try:
                return _coerce(value, option, key, where)
            except ValueError as err:
                errors.append(str(err))
        raise ValueError(errors[0])
    if origin is list:
        (item_type,) = typing.get_args(hint) or (object,)
        if not isinstance(value, (list, tuple)):
            if item_type is str and isinstance(value, str):
                return [value]  # data.shards=/path means one folder, not a list of characters
            # A scalar where a list is expected: let the section's validate() interpret it
            # (e.g. model.image_size=1280 means square); store as given.
            return _coerce(value, item_type, key, where) if item_type is not object else value
        return [_coerce(v, item_type, key, where) for v in value]
    if hint is float and isinstance(value, int) and not isinstance(value, bool):
        return float(value)
    if hint is float and isinstance(value, str):
        with contextlib.suppress(ValueError):  # YAML 1.1 reads "3e-4" (no dot) as a string
            value = float(value)
    if hint is float and isinstance(value, float) and not math.isfinite(value):
        raise ValueError(f"{where}: {key} must be finite, got {value}")
    if hint in (int, float, str, bool):
        is_bool_for_int = hint is int and isinstance(value, bool)  # bool is an int subclass in Python
        if not isinstance(value, hint) or is_bool_for_int:
            raise ValueError(f"{where}: {key} expects {hint.__name__}, got {value!r}")
    return value


def save_resolved_config(cfg: RunConfig, out_dir: Path, extra: dict | None = None) -> None:
    """Write the resolved config (YAML) and run facts such as the git revision into the run folder."""
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "config.yaml").write_text(yaml.safe_dump(cfg.to_dict(), sort_keys=False))
    (out_dir / "run_info.json").write_text(json.dumps(extra or {}, indent=2, sort_keys=True))
