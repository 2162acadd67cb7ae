"""Radiology report generation: ViT encoder -> Transformer decoder, scored with pycocoevalcap.

`task: report` of the engine (`tasks.build_task`); the commands finetune / evaluate / predict /
export serve it through `xray_pretrain.inference`. docs/report_generation.md maps each Task protocol
member to what this task does.

Batch contract it reads (the loaders' report mode): ``image`` (B, 1, H, W) for ``report.views=1`` or
(B, 2, 1, H, W) frontal then lateral for ``views=2``; ``report`` list of B strings, the raw text of
``report.section`` (:func:`xray_pretrain.report.studies.report_text`); ``key``, ``position``,
``weight`` (0 for padding rows) as for every task. Tokenization happens here, not in the loaders:
the tokenizer belongs to the run (built from the training reports in `select_train_samples`, saved
in every checkpoint's inference.json, taken back by a resumed run in `restore_inference_state`).
"""

from __future__ import annotations

import logging
from collections.abc import Iterable

import torch

from xray_pretrain.collectives import all_ranks_true, gather_samples
from xray_pretrain.data.reports import train_report_texts
from xray_pretrain.data.shards import SplitTable
from xray_pretrain.models import build_encoder
from xray_pretrain.models.param_groups import encoder_layer_decay_groups
from xray_pretrain.models.report import GenerationOptions, ReportDecoderConfig, ReportGenerator
from xray_pretrain.report.cider import CiderD
from xray_pretrain.report.clinical import ChexbertLabeler
from xray_pretrain.report.metrics import TRUNCATED_SUFFIX, r2gen_truncated_references, score_reports
from xray_pretrain.report.tokenizer import BOS_ID, EOS_ID, PAD_ID, ReportTokenizer

log = logging.getLogger(__name__)


def _on_rank0(compute):
    """``compute()`` on rank 0, its result (or its error) broadcast to every rank, so that a failure
    stops all ranks instead of leaving them waiting; just ``compute()`` without a process group."""
    if not (torch.distributed.is_initialized() and torch.distributed.get_world_size() > 1):
        return compute()
    outcome: list = [None]
    if torch.distributed.get_rank() == 0:
        try:
            outcome = [(True, compute())]
        except Exception as error:  # re-raised on every rank below
            outcome = [(False, f"{type(error).__name__}: {error}")]
    torch.distributed.broadcast_object_list(outcome, src=0)
    ok, value = outcome[0]
    if not ok:
        raise RuntimeError(f"report scoring failed on rank 0: {value}")
    return value


class ReportTask:
    preview_name = None
    val_whole_split = True  # generation is scored over the whole split, gathered from every rank
    init_new_prefixes = ("memory.", "embed.", "blocks.", "norm.", "head.")  # the decoder is new
    init_unused_prefixes = ("decoder_", "mask_fill.")  # the MAE's pixel decoder and mask token

    def __init__(self, cfg):
        self.cfg = cfg
        self.rcfg = cfg.report
        self.rcfg.validate()
        self.selection = (f"val_{self.rcfg.select_metric}", "max")
        self.tokenizer: ReportTokenizer | None = None
        self._labeler: ChexbertLabeler | None = None  # built at the first evaluation that needs it
        self._reward: CiderD | None = None  # self-critical training's CIDEr-D (select_train_samples)
        self._self_critical = False  # this step's loss (begin_step)

    # ---- data ------------------------------------------------------------------------------------
    def select_train_samples(self, table: SplitTable) -> SplitTable:
        """Build the tokenizer from the training items' reports (every rank builds the same one), unless
        a resumed run already took its checkpoint's (:meth:`restore_inference_state`). The loaders
        group the table into report items themselves: the table is returned as it is."""
        texts = train_report_texts(table, self.rcfg.section, self.rcfg.views)
        if self.tokenizer is None:
            self.bind_reports(texts)
        else:
            log.info("report tokenizer: the resumed checkpoint's (%d words)", len(self.tokenizer.words))
        if self.rcfg.scst_fraction > 0:  # CIDEr-D's document frequencies: the training references
            self._reward = CiderD(self.tokenizer.clean(t) for t in texts)
        return table

    def bind_data(self, info) -> None:
        pass  # no labels: the tokenizer (select_train_samples) is all the model needs from the data

    def restore_inference_state(self, info: dict) -> None:
        """A resumed run continues with its checkpoint's tokenizer (inference.json), never a rebuilt
        one: the vocabulary is tied to the saved embedding and output rows."""
        self.bind_tokenizer(tokenizer_from_state(info))

    def bind_reports(self, train_reports: Iterable[str]) -> ReportTokenizer:
        """Build the tokenizer from the training split's report texts (one per report item)."""
        self.tokenizer = ReportTokenizer.build(
            train_reports, self.rcfg.cleaning, self.rcfg.min_count, self.rcfg.max_length
        )
        log.info(
            "report tokenizer: %d words (+%d special) seen >= %d times in training, max %d ids",
            len(self.tokenizer.words), self.tokenizer.vocab_size - len(self.tokenizer.words),
            self.tokenizer.min_count, self.tokenizer.max_length,
        )  # fmt: skip
        return self.tokenizer

    def bind_tokenizer(self, tokenizer: ReportTokenizer) -> None:
        """The tokenizer saved with a checkpoint or export (resume, evaluate, predict)."""
        self.tokenizer = tokenizer

    def _tokenizer(self) -> ReportTokenizer:
        if self.tokenizer is None:
            raise ValueError(
                "the report task has no tokenizer: bind_reports (training) or bind_tokenizer first"
            )
        return self.tokenizer

    def encode_reports(self, reports: list[str], device) -> torch.Tensor:
        """(B, T) ids ``<bos> words <eos>``, right-padded with ``<pad>`` to the longest in the batch."""
        tok = self._tokenizer()
        encoded = [tok.encode(r) for r in reports]
        ids_BT = torch.full((len(encoded), max(map(len, encoded))), PAD_ID, dtype=torch.long)
        for i, ids in enumerate(encoded):
            ids_BT[i, : len(ids)] = torch.tensor(ids)
        return ids_BT.to(device, non_blocking=True)

    # ---- model -----------------------------------------------------------------------------------
    def build_model(self) -> ReportGenerator:
        tok = self._tokenizer()
        rc = self.rcfg
        decoder = ReportDecoderConfig(
            vocab_size=tok.vocab_size, max_length=tok.max_length, dim=rc.decoder_dim, depth=rc.decoder_depth,
            num_heads=rc.decoder_heads, num_views=rc.views, label_smoothing=rc.label_smoothing,
            feature_grid=tuple(rc.feature_grid) if rc.feature_grid else None, attn=self.cfg.model.attn,
            pad_id=PAD_ID, bos_id=BOS_ID, eos_id=EOS_ID,
        )  # fmt: skip
        model = ReportGenerator(build_encoder(self.cfg.model), decoder)
        model.freeze_encoder(rc.freeze_blocks)
        return model

    def param_groups(self, model, weight_decay: float) -> list[dict]:
        return encoder_layer_decay_groups(model, weight_decay, self.rcfg.layer_decay)

    # ---- training and evaluation -----------------------------------------------------------------
    def begin_step(self, step: int, total_steps: int) -> None:
        """Cross-entropy (teacher forcing) until the last ``report.scst_fraction`` of the steps, then
        self-critical CIDEr-D optimization."""
        first_scst_step = total_steps - round(total_steps * self.rcfg.scst_fraction)
        self_critical = self.rcfg.scst_fraction > 0 and step >= first_scst_step
        if self_critical and not self._self_critical:
            log.info(
                "step %d: self-critical training (CIDEr-D reward, %d samples per item) until step %d",
                step, self.rcfg.scst_samples, total_steps,
            )  # fmt: skip
        self._self_critical = self_critical

    def training_loss(self, model, batch, device, dtype):
        images = batch["image"].to(device, non_blocking=True).to(dtype)
        if self._self_critical:
            return self.self_critical_loss(model, images, batch["report"], batch["weight"].to(device))
        out = model(images, self.encode_reports(batch["report"], device))
        return out.loss, {}

    def self_critical_loss(self, model, images, reports: list[str], weight_B: torch.Tensor):
        """Self-critical sequence training (Rennie et al. 2017) with the mean-of-other-samples baseline
        (Luo 2020, "A better variant of SCST"): ``report.scst_samples`` reports sampled per item, each
        rewarded with its CIDEr-D against the item's cleaned reference (document frequencies from the
        training references); loss = -(reward - mean reward of the item's other samples) x the
        sample's token log-probabilities, averaged over the sampled tokens. No greedy pass: the other
        samples are the baseline. Returns (loss, {"scst_reward": mean sample CIDEr-D})."""
        if self._reward is None:
            raise ValueError(
                "self-critical training needs the training references: select_train_samples first"
            )
        k, tok = self.rcfg.scst_samples, self._tokenizer()
        options = GenerationOptions(
            num_samples=k, all_finished=lambda done: all_ranks_true(done, images.device)
        )
        sampled_NT = model(images, generation=options)  # (B * k, T), no gradient
        hypotheses = [tok.decode(ids) for ids in sampled_NT.tolist()]
        references = [tok.clean(r) for r in reports for _ in range(k)]
        reward_BK = torch.tensor(self._reward.scores(hypotheses, references), device=images.device).view(
            -1, k
        )
        advantage_BK = (reward_BK - (reward_BK.sum(1, keepdim=True) - reward_BK) / (k - 1)) * weight_B[
            :, None
        ]
        bos_N1 = torch.full((sampled_NT.shape[0], 1), BOS_ID, dtype=torch.long, device=sampled_NT.device)
        out = model(images.repeat_interleave(k, 0), torch.cat([bos_N1, sampled_NT], dim=1))
        log_probs_NT = out.logits_BTV.float().log_softmax(-1).gather(-1, sampled_NT[..., None])[..., 0]
        tokens_NT = (sampled_NT != PAD_ID).float()  # words and the <eos>; <pad> after it
        loss = -(advantage_BK.flatten()[:, None] * log_probs_NT * tokens_NT).sum() / tokens_NT.sum()
        return loss, {"scst_reward": reward_BK.mean()}

    @torch.no_grad()
    def generate(self, model, images: torch.Tensor) -> list[str]:
        """Cleaned report text per sample. Every rank steps until all ranks are done (ZeRO-3)."""
        rc = self.rcfg
        options = GenerationOptions(
            beam_size=rc.beam_size, length_penalty=rc.length_penalty, block_trigrams=rc.block_trigrams,
            all_finished=lambda done: all_ranks_true(done, images.device),
        )  # fmt: skip
        ids_BT = model(images, generation=options)  # through the engine's forward: ZeRO-3 gathers there
        return [self._tokenizer().decode(ids) for ids in ids_BT.tolist()]

    @torch.no_grad()
    def predict_rows(self, model, loader, device, dtype) -> dict[str, list]:
        """Every real sample of ``loader`` over all ranks, in position order: ``key``, ``position``,
        ``reference`` (the full report, cleaned), ``generated``."""
        module = getattr(model, "module", model)
        was_training = module.training
        module.eval()
        rows: dict[str, list] = {"key": [], "position": [], "reference": [], "generated": []}
        weights: list[float] = []  # padding rows (0) are generated with the rest, scored nowhere
        for batch in loader:
            rows["generated"].extend(
                self.generate(model, batch["image"].to(device, non_blocking=True).to(dtype))
            )
            rows["key"].extend(batch["key"])
            rows["position"].extend(batch["position"].tolist())
            rows["reference"].extend(batch["report"])
            weights.extend(batch["weight"].tolist())
        module.train(was_training)
        return gather_samples(rows, weights, order_by="position")

    def evaluate(self, model, loader, device, dtype, fitted: dict | None = None) -> dict:
        rows = self.predict_rows(model, loader, device, dtype)
        # Every rank holds every row; one rank scores (one METEOR JVM, one CheXbert), all get the result.
        return _on_rank0(lambda: self.metrics(rows["reference"], rows["generated"]))

    def metrics(self, raw_references: list[str], generated: list[str]) -> dict:
        """``val_``-prefixed scores against the full cleaned references (+ R2Gen's truncated variant,
        suffixed, when ``report.r2gen_truncated_refs``; + clinical efficacy with ``report.chexbert``)."""
        tok = self._tokenizer()
        rc = self.rcfg
        references = [tok.clean(r) for r in raw_references]
        scores = score_reports(references, generated, meteor=rc.meteor, meteor_timeout_s=rc.meteor_timeout_s)
        out = {f"val_{k}": v for k, v in scores.items()}
        if rc.r2gen_truncated_refs:
            truncated = score_reports(
                r2gen_truncated_references(tok, raw_references), generated, meteor=False
            )
            out.update({f"val_{k}{TRUNCATED_SUFFIX}": v for k, v in truncated.items() if k != "meteor"})
        if rc.chexbert is None:
            log.info("clinical efficacy skipped: no report.chexbert / report.chexbert_vocab given")
        else:
            if self._labeler is None:
                self._labeler = ChexbertLabeler(rc.chexbert, rc.chexbert_vocab)
            out.update({f"val_{k}": v for k, v in self._labeler.scores(references, generated).items()})
        out["val_num_reports"] = len(generated)
        return out

    def fitted_state(self) -> dict:
        return {}  # nothing is fitted on validation: decoding options come from the config

    def inference_state(self, fitted: dict) -> dict:
        rc = self.rcfg
        return {
            "tokenizer": self._tokenizer().to_json(),
            "views": rc.views,
            "section": rc.section,
            "beam_size": rc.beam_size,
            "length_penalty": rc.length_penalty,
            "block_trigrams": rc.block_trigrams,
        }

    def preview_image(self, model, loader, device, dtype, num_images: int = 4):
        return None

    def flops_per_sample(self) -> float | None:
        return None  # MFU is reported for pre-training


def tokenizer_from_state(info: dict) -> ReportTokenizer:
    """The tokenizer a report checkpoint's inference.json holds (its ``tokenizer`` entry)."""
    if not info.get("tokenizer"):
        raise ValueError("the checkpoint holds no report tokenizer (inference.json has no 'tokenizer')")
    return ReportTokenizer.from_json(info["tokenizer"], "the checkpoint's inference.json tokenizer")
