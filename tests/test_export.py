"""Export: a timm model folder that timm alone loads, a model card, and the way back into our encoder.

Encoders are built here (tiny, seconds); the pre-training checkpoint-to-export path runs in
test_training.py on the session's DeepSpeed runs, a fine-tuned classifier's here (a 1-rank linear probe
on the session's ZeRO-2 run).
"""

from __future__ import annotations

import csv
import json
import subprocess
import sys

import pytest
import torch

from xray_pretrain.cli import main as cli_main
from xray_pretrain.config import load_config
from xray_pretrain.engine.export import (
    TIMM_VITS,
    ClassifierHead,
    load_exported_encoder,
    nearest_timm_vit,
    read_export,
    write_export,
)
from xray_pretrain.engine.model_card import pooled_normalization, pretraining_data
from xray_pretrain.inference import load_classifier
from xray_pretrain.models import ClassificationModel, ViTEncoder

timm = pytest.importorskip("timm")

TINY = {"patch_size": 8, "embed_dim": 48, "depth": 2, "num_heads": 3}

# Runs in a fresh interpreter that imports timm and torch only: what a user of the export has.
TIMM_ONLY = """
import sys, timm, torch
images = torch.load(sys.argv[1])
outputs = []
for folder in sys.argv[2:]:
    model = timm.create_model("local-dir:" + folder, pretrained=True).eval()
    with torch.no_grad():
        outputs.append((model.forward_features(images[len(outputs)]), model(images[len(outputs)])))
assert not [m for m in sys.modules if m.split(".")[0] in ("xray_pretrain", "xray_core", "data_tools")]
torch.save(outputs, sys.argv[1] + ".out")
"""


def timm_alone(folders, images, tmp_path) -> list[tuple[torch.Tensor, torch.Tensor]]:
    path = tmp_path / "images.pt"
    torch.save(images, path)
    command = [sys.executable, "-c", TIMM_ONLY, str(path), *map(str, folders)]
    subprocess.run(command, check=True, timeout=180, cwd=tmp_path)
    return torch.load(str(path) + ".out")


def tiny_encoder(image_size, seed=0, **overrides) -> ViTEncoder:
    torch.manual_seed(seed)
    return ViTEncoder(image_size=image_size, **{**TINY, **overrides}).eval()


def test_timm_loads_the_export_alone_with_the_same_features_at_two_sizes(phantom_shards, tmp_path):
    data = pretraining_data([phantom_shards])
    manifest = json.loads((phantom_shards / "manifest.json").read_text())
    sizes = [(64, 64), (64, 96)]
    encoders = [tiny_encoder(size, seed=i) for i, size in enumerate(sizes)]
    folders = [tmp_path / f"export{i}" for i in range(len(sizes))]
    for encoder, folder in zip(encoders, folders):
        summary = write_export(encoder, folder, data)
        assert summary["format"] == "timm" and sorted(summary["files"]) == sorted(
            p.name for p in folder.iterdir()
        )
    images = [torch.rand(2, 1, *size) for size in sizes]
    for (tokens, pooled), encoder, x in zip(timm_alone(folders, images, tmp_path), encoders, images):
        with torch.no_grad():
            ours = encoder(x)
        assert tokens.shape == ours.shape
        assert float((tokens - ours).abs().max()) <= 1e-5
        assert torch.equal(pooled, tokens[:, 0])  # features only: the cls token
    config = json.loads((folders[1] / "config.json").read_text())
    assert config["architecture"] == "vit_tiny_patch16_224" == nearest_timm_vit(48, 8)
    args = config["model_args"]
    assert (args["img_size"], args["patch_size"], args["in_chans"]) == ([64, 96], 8, 1)
    assert (args["embed_dim"], args["depth"], args["num_heads"], args["num_classes"]) == (48, 2, 3, 0)
    assert config["global_pool"] == "token" and config["num_classes"] == 0
    cfg = config["pretrained_cfg"]
    assert cfg["input_size"] == [1, 64, 96]
    assert cfg["mean"] == [manifest["intensity"]["mean"]] and cfg["std"] == [manifest["intensity"]["std"]]
    assert "tag" not in cfg and "license" not in cfg  # the ImageNet weights' facts are not ours


def test_model_card_has_the_data_the_loading_line_and_no_patient_data(phantom_shards, tmp_path):
    write_export(tiny_encoder((64, 64)), tmp_path / "export", pretraining_data([phantom_shards]))
    card = (tmp_path / "export" / "README.md").read_text()
    manifest = json.loads((phantom_shards / "manifest.json").read_text())
    splits = manifest["splits"]
    row = f"| {manifest['num_inputs']} | {manifest['num_samples']} | {manifest['num_skipped']} "
    assert row in card and f"| {splits['train']} / {splits['val']} / {splits['test']} |" in card
    assert f'timm.create_model("local-dir:{(tmp_path / "export").resolve()}", pretrained=True)' in card
    assert "Not a medical device" in card and "library_name: timm" in card
    assert f"mean {manifest['intensity']['mean']:.6f}" in card
    with open(phantom_shards / "id_map.csv") as f:
        rows = list(csv.DictReader(f))
    written = card + (tmp_path / "export" / "config.json").read_text()
    for row in rows:
        assert row["patient"] not in written and row["source_path"] not in written


@pytest.mark.parametrize("pool", ["token", "avg"])
def test_classifier_head_round_trips_with_its_label_names(phantom_shards, tmp_path, pool):
    encoder = tiny_encoder((64, 64))
    names = ["Atelectasis", "Effusion", "No Finding"]
    head = ClassifierHead(torch.randn(3, 48), torch.randn(3), names, pool)
    write_export(encoder, tmp_path, pretraining_data([phantom_shards]), head=head)
    model = timm.create_model(f"local-dir:{tmp_path}", pretrained=True).eval()
    assert model.pretrained_cfg["label_names"] == names and model.num_classes == 3
    x = torch.rand(2, 1, 64, 64)
    with torch.no_grad():
        tokens = encoder(x)
        pooled = tokens[:, 0] if pool == "token" else tokens[:, 1:].mean(1)
        torch.testing.assert_close(model(x), pooled @ head.weight_CD.T + head.bias_C, atol=1e-5, rtol=0)
    back = read_export(tmp_path)
    assert back.head.label_names == names and back.head.global_pool == pool
    assert torch.equal(back.head.weight_CD, head.weight_CD) and torch.equal(back.head.bias_C, head.bias_C)
    with torch.no_grad():
        assert torch.equal(back.encoder.eval()(x), tokens)


def test_read_export_gives_an_encoder_config_and_a_strict_state_dict(phantom_shards, tmp_path):
    encoder = tiny_encoder((64, 96))
    write_export(encoder, tmp_path, pretraining_data([phantom_shards]), dtype="bf16")
    back = read_export(tmp_path)
    assert back.format == "timm" and back.head is None
    assert back.encoder_kwargs == encoder.init_kwargs()
    fresh = ViTEncoder(**back.encoder_kwargs)
    fresh.load_state_dict(back.state_dict, strict=True)
    for name, value in encoder.state_dict().items():  # bf16 on disk: equal to bf16 rounding
        torch.testing.assert_close(back.state_dict[name], value.bfloat16().float(), atol=0, rtol=0)


def test_hierarchical_stem_keeps_the_native_format_and_says_so(phantom_shards, tmp_path):
    encoder = tiny_encoder((128, 192), stem="hierarchical", patch_size=16)
    summary = write_export(encoder, tmp_path, pretraining_data([phantom_shards]))
    assert summary["format"] == "native" and (tmp_path / "encoder.safetensors").is_file()
    assert not (tmp_path / "model.safetensors").exists()
    config = json.loads((tmp_path / "config.json").read_text())
    assert config["architecture"] == "vit_mae_encoder" and "no timm class" in config["timm"]
    assert "timm cannot load it" in (tmp_path / "README.md").read_text()
    reloaded, _ = load_exported_encoder(tmp_path)
    x = torch.rand(1, 1, 128, 192)
    with torch.no_grad():
        assert torch.equal(reloaded.eval()(x), encoder(x))
    with pytest.raises(RuntimeError, match="Unknown model"):
        timm.create_model(f"local-dir:{tmp_path}", pretrained=True)


def test_reader_refuses_folders_that_do_not_fit(tmp_path):
    with pytest.raises(ValueError, match="not an export folder"):
        read_export(tmp_path)
    # A timm ViT of the same layout but a learned position embedding: loading it as ours would
    # silently mean something else.
    vit = timm.create_model(
        "vit_tiny_patch16_224", img_size=64, patch_size=8, in_chans=1, num_classes=0, embed_dim=48, depth=2
    )
    timm.models.save_for_hf(vit, tmp_path / "learned", safe_serialization=True)
    with pytest.raises(ValueError, match="sin-cos"):
        read_export(tmp_path / "learned")
    with pytest.raises(ValueError, match="distinct label names"):
        ClassifierHead(torch.zeros(2, 4), torch.zeros(2), ["a"])


def test_nearest_timm_vit_names_registered_models():
    assert all(timm.is_model(name) for name in TIMM_VITS.values())
    assert nearest_timm_vit(1024, 16) == "vit_large_patch16_224"
    assert nearest_timm_vit(1280, 16) == "vit_huge_patch14_224"
    assert nearest_timm_vit(768, 8) == "vit_base_patch8_224"


def test_normalization_pools_folders_and_needs_their_manifests(tmp_path):
    def folder(mean, std, num):
        return {
            "intensity": {"mean": mean, "std": std, "split": "train"},
            "splits": {"train": num},
            "num_samples": num,
        }

    one = pooled_normalization([folder(0.4, 0.2, 10)])
    assert (one["mean"], one["std"]) == pytest.approx((0.4, 0.2))
    # Two equal-weight folders at 0.2 and 0.6, each with std 0.1: the mixture has mean 0.4 and
    # variance 0.01 + 0.04.
    two = pooled_normalization([folder(0.2, 0.1, 5), folder(0.6, 0.1, 5)])
    assert (two["mean"], two["std"]) == pytest.approx((0.4, 0.05**0.5))
    with pytest.raises(ValueError, match="manifest.json not found"):
        pretraining_data([tmp_path])


# ---- a fine-tuned classifier --------------------------------------------------------------------
LABEL_NAMES = ["cardiomegaly", "pleural_effusion", "nodule", "pneumothorax", "consolidation"]  # phantoms'


@pytest.fixture(scope="module")
def probe_run(zero2_run, phantom_shards, tmp_path_factory, one_cpu_thread):
    """A 4-step, 1-rank linear probe (BatchNorm + linear on mean-pooled tokens) of the ZeRO-2 run."""
    from xray_pretrain.engine.trainer import train

    out = tmp_path_factory.mktemp("probe")
    overrides = [
        "model.image_size=[64,64]", "model.patch_size=8", "model.drop_path=0", f"data.shards=[{phantom_shards}]",
        f"log.out_dir={out}", f"init.weights={zero2_run[0]}", "classify.mode=linear", "classify.pool=mean",
        "log.progress=false", "train.micro_batch=8", "train.global_batch=16", "train.epochs=null",
        "train.steps=4", "log.val_every=2", "checkpoint.every=4", "checkpoint.keep_last=1", "data.num_workers=0",
    ]  # fmt: skip
    train(load_config("classify_phantom", overrides))
    return out


def test_a_fine_tuned_classifier_exports_with_its_head_labels_and_metrics(probe_run, tmp_path, capsys):
    assert cli_main(["export", "--checkpoint", str(probe_run), "--out", str(tmp_path / "export")]) == 0
    assert "classifier (5 labels)" in capsys.readouterr().out
    classifier = load_classifier(probe_run, device="cpu")  # the run folder means `best`, as for export
    norm = classifier.model.head[0]
    assert float(norm.running_mean.abs().max()) > 0.01  # the fold has statistics to fold
    x = torch.randn(3, 1, 64, 64)  # the trained size
    [(_, timm_logits)] = timm_alone([tmp_path / "export"], [x], tmp_path)
    with torch.no_grad():
        ours = classifier.model(x)
    assert timm_logits.shape == ours.shape == (3, 5)
    assert float((timm_logits - ours).abs().max()) <= 1e-5
    config = json.loads((tmp_path / "export" / "config.json").read_text())
    assert config["label_names"] == classifier.info["label_names"] == LABEL_NAMES
    loaded = timm.create_model(f"local-dir:{tmp_path / 'export'}", pretrained=True)
    assert loaded.pretrained_cfg["label_names"] == LABEL_NAMES
    assert config["global_pool"] == "avg" and config["model_args"]["fc_norm"] is False
    assert config["pretrained_cfg"]["mean"] == [classifier.info["intensity"]["mean"]]
    assert config["xray_pretrain"]["classifier"]["thresholds"] == classifier.info["thresholds"]
    card = (tmp_path / "export" / "README.md").read_text()
    auroc = json.loads((probe_run / "metrics.json").read_text())["test"]["test_mean_auroc"]
    assert f"| test/test_mean_auroc | {auroc:.6g} |" in card and "classification head" in card
    assert "## Fine-tuning data" in card and "mode=linear" in card.split("- classify: ")[1]


@pytest.mark.parametrize(("probe_norm", "pool"), [(True, "cls"), (False, "mean")])
def test_folded_head_equals_the_head_in_eval_mode(probe_norm, pool):
    torch.manual_seed(0)
    model = ClassificationModel(tiny_encoder((32, 32)), 4, pool, probe_norm=probe_norm, head_init_std=0.1)
    if probe_norm:
        norm = model.head[0]
        norm.running_mean.normal_(0, 2)
        norm.running_var.uniform_(0.01, 9)
    model.eval()
    x = torch.randn(5, 1, 32, 32)
    weight_CD, bias_C = model.folded_head()
    with torch.no_grad():
        features = model.features(x)
        torch.testing.assert_close(features @ weight_CD.T + bias_C, model(x), atol=1e-5, rtol=1e-6)
