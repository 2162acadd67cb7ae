"""The run config: YAML overlays, typed CLI overrides, validation, and the generated DeepSpeed JSON."""

import json

import pytest

from xray_pretrain.config import RunConfig, config_from_dict, load_config
from xray_pretrain.engine.ds_config import build_ds_config
from xray_pretrain.engine.optim import lr_at
from xray_pretrain.models.param_groups import param_groups

TINY = "tiny_cpu"
SHARDS = "data.shards=[runs/shards]"


def load(overrides=()):
    return load_config(TINY, [SHARDS, *overrides])


def test_yaml_holds_differences_and_overrides_are_typed():
    cfg = load_config(
        TINY, ["train.steps=7", "optim.base_lr=3e-4", "data.shards=[a, b]", "model.norm_pix_loss=true"]
    )
    assert cfg.train.steps == 7
    assert cfg.optim.base_lr == pytest.approx(3e-4)
    assert cfg.data.shards == ["a", "b"]
    assert cfg.model.norm_pix_loss is True
    assert cfg.model.patch_size == 16  # from the YAML
    assert cfg.optim.weight_decay == RunConfig().optim.weight_decay  # untouched default


@pytest.mark.parametrize(
    ("override", "message"),
    [
        ("train.stpes=3", "unknown key 'train.stpes'"),
        ("nosuch.key=3", "unknown config section"),
        ("train.steps=many", "train.steps expects int"),
        ("train.steps=true", "train.steps expects int"),
        ("train.precision=fp8", "train.precision must be one of"),
        ("train.global_batch=30", "not a multiple of train.micro_batch"),
        ("steps", "section.key=value"),
        ("data.shards=[]", "no training data"),
    ],
)
def test_bad_overrides_fail_before_any_work(override, message):
    with pytest.raises(ValueError, match=message):
        load([override])


def test_config_round_trips_through_a_dict():
    cfg = load(["train.steps=11"])
    again = config_from_dict(json.loads(json.dumps(cfg.to_dict())))
    assert again.to_dict() == cfg.to_dict()


@pytest.mark.parametrize(("world_size", "accum"), [(1, 4), (2, 2), (4, 1)])
def test_global_batch_is_fixed_and_accumulation_adapts(world_size, accum):
    cfg = load(["train.global_batch=64", "train.micro_batch=16", "train.precision=bf16"])
    ds = build_ds_config(cfg, world_size)
    assert ds["train_batch_size"] == 64
    assert ds["train_micro_batch_size_per_gpu"] == 16
    assert ds["gradient_accumulation_steps"] == accum
    assert ds["bf16"]["enabled"] is True and ds["fp16"]["enabled"] is False
    assert ds["gradient_clipping"] == cfg.optim.clip_grad
    assert ds["zero_optimization"]["stage"] == cfg.train.zero_stage


def test_world_size_that_cannot_keep_the_global_batch_is_refused():
    cfg = load(["train.global_batch=32", "train.micro_batch=16"])
    with pytest.raises(ValueError, match="not divisible by micro_batch\\*world_size"):
        build_ds_config(cfg, 4)


def test_ds_json_may_not_set_what_the_run_config_owns(tmp_path):
    bad = tmp_path / "ds.json"
    bad.write_text(json.dumps({"zero_optimization": {"stage": 2}, "train_batch_size": 8}))
    cfg = load([f"train.ds_config={bad}"])
    with pytest.raises(ValueError, match="train_batch_size"):
        build_ds_config(cfg, 1)


def test_lr_follows_mae_rule_warmup_and_cosine():
    cfg = load(["train.global_batch=512", "train.micro_batch=16", "optim.base_lr=1e-4"])
    peak = cfg.optim.lr(cfg.train.global_batch)
    assert peak == pytest.approx(1e-4 * 512 / 256)
    kw = dict(peak_lr=peak, warmup_steps=10, total_steps=110, min_lr=1e-6)
    assert lr_at(0, **kw) == pytest.approx(peak / 10)
    assert lr_at(9, **kw) == pytest.approx(peak)
    assert lr_at(60, **kw) == pytest.approx(1e-6 + (peak - 1e-6) * 0.5)
    assert lr_at(110, **kw) == pytest.approx(1e-6)
    assert all(lr_at(s, **kw) >= lr_at(s + 1, **kw) for s in range(10, 110))


def test_no_weight_decay_on_norms_biases_and_tokens():
    from xray_pretrain.models import build_mae

    cfg = load()
    model = build_mae(cfg.model, cfg.mask)
    groups = {g["name"]: g for g in param_groups(model, 0.05)}
    names = {id(p): n for n, p in model.named_parameters()}
    no_decay = {names[id(p)] for p in groups["no_decay"]["params"]}
    decay = {names[id(p)] for p in groups["decay"]["params"]}
    assert groups["no_decay"]["weight_decay"] == 0.0 and groups["decay"]["weight_decay"] == 0.05
    assert any("norm" in n for n in no_decay) and any(n.endswith("bias") for n in no_decay)
    assert {n for n in no_decay if n.endswith(("cls_token", "mask_token"))}
    assert all(p.ndim >= 2 for n, p in model.named_parameters() if n in decay)
    assert not any(n.endswith(("cls_token", "mask_token", "pos_embed")) or "norm" in n for n in decay)


def test_bad_numbers_and_unparsable_overrides_are_one_clear_error():
    for bad in ("optim.base_lr=.nan", "optim.base_lr=.inf", "optim.weight_decay=.nan"):
        with pytest.raises(ValueError, match="must be finite"):
            load([bad])
    with pytest.raises(ValueError, match="not valid YAML"):
        load(["data.shards=[/x"])


def test_a_single_folder_without_brackets_is_a_one_item_list():
    assert load(["data.shards=/data/nih"]).data.shards == ["/data/nih"]


def test_packaged_config_by_name_path_or_configs_prefix():
    names = {
        load_config(name, [SHARDS]).model.size
        for name in ("tiny_cpu", "tiny_cpu.yaml", "configs/tiny_cpu.yaml")
    }
    assert names == {"tiny"}
    with pytest.raises(ValueError, match="packaged: .*tiny_cpu"):
        load_config("no_such_config", [SHARDS])


def test_dist_timeout_is_a_finite_number_of_seconds():
    assert load(["train.dist_timeout_s=30"]).train.dist_timeout_s == 30.0
    for bad in ("0", "0.5", "-1", ".nan", ".inf"):
        with pytest.raises(
            ValueError, match="train.dist_timeout_s must be (finite|a number of seconds >= 1)"
        ):
            load([f"train.dist_timeout_s={bad}"])
