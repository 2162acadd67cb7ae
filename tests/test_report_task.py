"""The report task on batches in the report batch contract: tokenizer from training reports, loss,
generation, pycocoevalcap metrics over real rows only, and a tiny model that learns two studies."""

from __future__ import annotations

import copy
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


def test_self_critical_phase_starts_at_its_fraction_of_the_steps():
    task = make_task(scst_fraction=0.25)
    phases = []
    for step in range(8):
        task.begin_step(step, 8)
        phases.append(task._self_critical)
    assert phases == [False] * 6 + [True] * 2
    off = make_task()
    off.begin_step(7, 8)
    assert not off._self_critical
    with pytest.raises(ValueError, match="scst_samples=1 must be >= 2"):
        make_task(scst_samples=1)


def test_self_critical_step_favours_the_samples_that_beat_their_baseline():
    """One small gradient step on the self-critical loss raises the log-probability of the samples
    whose CIDEr-D beats the mean of their item's other samples and lowers the others': the change
    in each sample's log-probability correlates with its advantage (the same samples are redrawn
    from the same RNG state)."""
    from xray_pretrain.models.report import GenerationOptions
    from xray_pretrain.report.cider import CiderD

    torch.manual_seed(0)
    k = 8
    task = make_task(scst_fraction=0.5, scst_samples=k)
    task._reward = CiderD(task.tokenizer.clean(r) for r in REPORTS * 3)
    model = task.build_model()
    images = torch.randn(2, 2, 1, 32, 32)
    train = batch(images, REPORTS, [1.0, 1.0])
    references = [task.tokenizer.clean(r) for r in REPORTS for _ in range(k)]
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3)
    task.begin_step(0, 2)  # a few cross-entropy steps: samples that differ in quality
    for _ in range(6):
        optimizer.zero_grad()
        task.training_loss(model, train, torch.device("cpu"), torch.float32)[0].backward()
        optimizer.step()
    task.begin_step(1, 2)
    start = copy.deepcopy(model.state_dict())
    for seed in range(3):
        model.load_state_dict(start)
        torch.manual_seed(seed)
        sampled_NT = model(images, generation=GenerationOptions(num_samples=k))
        reward_BK = torch.tensor(
            task._reward.scores([task.tokenizer.decode(ids) for ids in sampled_NT.tolist()], references)
        ).view(2, k)
        advantage = (reward_BK - (reward_BK.sum(1, keepdim=True) - reward_BK) / (k - 1)).flatten()

        def log_probs(sampled_NT: torch.Tensor = sampled_NT) -> torch.Tensor:
            with torch.no_grad():
                ids_NT = torch.cat([torch.ones_like(sampled_NT[:, :1]), sampled_NT], dim=1)  # <bos> = 1
                logits = model(images.repeat_interleave(k, 0), ids_NT).logits_BTV
            per_token = logits.log_softmax(-1).gather(-1, sampled_NT[..., None])[..., 0]
            return (per_token * (sampled_NT != 0)).sum(1)

        before = log_probs()
        torch.manual_seed(seed)  # the loss draws the same samples
        model.zero_grad()
        loss, logs = task.training_loss(model, train, torch.device("cpu"), torch.float32)
        loss.backward()
        assert float(logs["scst_reward"]) == pytest.approx(float(reward_BK.mean()))
        with torch.no_grad():
            for p in model.parameters():
                if p.grad is not None:
                    p -= 0.05 * p.grad
        change = log_probs() - before
        assert advantage.std() > 0 and torch.corrcoef(torch.stack([advantage, change]))[0, 1] > 0.3
