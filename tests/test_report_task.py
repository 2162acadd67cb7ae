"""The report task on batches in the report batch contract: tokenizer from training reports, loss,
generation, pycocoevalcap metrics over real rows only, and a tiny model that learns two studies."""

from __future__ import annotations

from types import SimpleNamespace

import pytest
import torch
from ranks import run_ranks

from xray_pretrain.models import MAEConfig
from xray_pretrain.tasks.report import ReportTask
from xray_pretrain.tasks.report_config import ReportConfig

pytestmark = pytest.mark.usefixtures("one_cpu_thread")
REPORTS = [
    "The heart is normal in size. The lungs are clear. No pleural effusion.",
    "Cardiomegaly. Small left pleural effusion. No pneumothorax.",
]


def make_task(**report) -> ReportTask:
    model = MAEConfig(size="tiny", image_size=[32, 32], patch_size=8, embed_dim=32, depth=1, num_heads=2)
    defaults = dict(
        views=2, decoder_dim=32, decoder_depth=1, decoder_heads=2, feature_grid=[2, 2], meteor=False
    )
    cfg = SimpleNamespace(model=model, report=ReportConfig(**{**defaults, **report}))
    task = ReportTask(cfg)
    task.bind_reports(REPORTS * 3)  # every word seen 3 times: in the vocabulary
    return task


def batch(images: torch.Tensor, reports: list[str], weights: list[float]) -> dict:
    B = len(reports)
    return {
        "image": images, "report": reports, "key": [f"k{i}" for i in range(B)],
        "position": torch.arange(B), "weight": torch.tensor(weights),
    }  # fmt: skip


def test_learns_two_studies_and_scores_them():
    torch.manual_seed(0)
    task = make_task()
    model = task.build_model()
    images = torch.randn(2, 2, 1, 32, 32)  # two studies, frontal + lateral
    train = batch(images, REPORTS, [1.0, 1.0])
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    first = None
    for _ in range(120):
        optimizer.zero_grad()
        loss, _ = task.training_loss(model, train, torch.device("cpu"), torch.float32)
        first = first if first is not None else loss.item()
        loss.backward()
        optimizer.step()
    assert loss.item() < 0.05 * first
    # Validation: the two studies plus a padding row (weight 0) that must not be scored.
    val = batch(torch.cat([images, images[:1]]), [*REPORTS, "padding"], [1.0, 1.0, 0.0])
    rows = task.predict_rows(model, [val], torch.device("cpu"), torch.float32)
    assert rows["key"] == ["k0", "k1"]
    assert rows["generated"] == [task.tokenizer.clean(r) for r in REPORTS]
    metrics = task.evaluate(model, [val], torch.device("cpu"), torch.float32)
    assert metrics["val_num_reports"] == 2 and metrics["val_meteor"] is None
    assert metrics["val_bleu_4"] == pytest.approx(1.0) and metrics["val_rouge_l"] == pytest.approx(1.0)
    assert task.selection == ("val_bleu_4", "max")


def test_truncated_reference_scores_are_labelled():
    task = make_task(max_length=6, r2gen_truncated_refs=True)
    hyp = [task.tokenizer.clean(r) for r in REPORTS]
    metrics = task.metrics(REPORTS, hyp)
    assert metrics["val_bleu_4"] == pytest.approx(1.0)  # full references: generated = cleaned report
    assert metrics["val_bleu_1_r2gen_truncated"] < 1.0  # references cut at 6 ids
    assert "val_meteor_r2gen_truncated" not in metrics


def test_inference_state_and_errors():
    task = make_task()
    state = task.inference_state({})
    assert state["tokenizer"]["words"] == list(task.tokenizer.words) and state["views"] == 2
    with pytest.raises(ValueError, match="report.views=3"):
        make_task(views=3)
    with pytest.raises(ValueError, match="has no tokenizer"):
        ReportTask(SimpleNamespace(model=MAEConfig(), report=ReportConfig())).build_model()


def test_clinical_efficacy_options_are_checked_before_work(tmp_path):
    with pytest.raises(ValueError, match="go together"):
        ReportConfig(chexbert=str(tmp_path / "chexbert.pth")).validate()
    with pytest.raises(ValueError, match=r"report.chexbert=.*chexbert.pth is not a file"):
        ReportConfig(
            chexbert=str(tmp_path / "chexbert.pth"), chexbert_vocab=str(tmp_path / "v.txt")
        ).validate()


def test_clinical_efficacy_skipped_without_weights(caplog):
    task = make_task()
    with caplog.at_level("INFO"):
        metrics = task.metrics(REPORTS, [task.tokenizer.clean(r) for r in REPORTS])
    assert not any(k.startswith("val_ce_") for k in metrics)
    assert "clinical efficacy skipped: no report.chexbert" in caplog.text


def test_two_ranks_gather_rows_in_position_order_and_agree_on_scores():
    def on_rank(rank: int):
        task = make_task()
        torch.manual_seed(0)
        model = task.build_model()  # the same weights on both ranks
        images = torch.randn(3, 2, 1, 32, 32, generator=torch.Generator().manual_seed(0))
        # Uneven: rank 0 has studies 0 and 2, rank 1 study 1 and a padding row.
        if rank == 0:
            val = batch(images[[0, 2]], [REPORTS[0], REPORTS[0]], [1.0, 1.0])
            val["position"] = torch.tensor([0, 2])
        else:
            val = batch(images[[1, 1]], [REPORTS[1], "padding"], [1.0, 0.0])
            val["position"] = torch.tensor([1, 3])
        rows = task.predict_rows(model, [val], torch.device("cpu"), torch.float32)
        metrics = task.evaluate(model, [val], torch.device("cpu"), torch.float32)
        return rows["position"], rows["reference"], metrics

    results = run_ranks(on_rank)
    assert results[0] == results[1]  # every rank: the same rows and the same metrics
    positions, references, metrics = results[0]
    assert positions == [0, 1, 2] and references == [REPORTS[0], REPORTS[1], REPORTS[0]]
    assert metrics["val_num_reports"] == 3
