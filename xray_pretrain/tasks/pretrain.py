"""MAE pre-training: masked reconstruction loss, validation against a trivial baseline, image grids."""

from __future__ import annotations

import numpy as np
import torch

from xray_pretrain.collectives import all_reduce_sum
from xray_pretrain.models import build_mae, estimate_step_flops
from xray_pretrain.models.param_groups import param_groups

# Stream tags: training and validation masks never share a noise stream.
NOISE_TRAIN, NOISE_VAL = 1, 2


def position_noise(positions: torch.Tensor, num_patches: int, seed: int, stream: int) -> torch.Tensor:
    """(B, L) masking noise that depends only on (seed, stream, each sample's position).

    Training: a sample's mask does not depend on which rank reads it or how the global batch is split
    into micro-batches, so a run resumed at another world size masks exactly as before.
    Validation: the same mask at every evaluation. Cost: ~20 us per sample at L = 6400.
    """
    rows = []
    for position in positions.tolist():
        (state,) = np.random.SeedSequence([seed, stream, int(position)]).generate_state(1, dtype=np.uint64)
        rows.append(torch.rand(num_patches, generator=torch.Generator().manual_seed(int(state))))
    return torch.stack(rows)


class PretrainTask:
    preview_name = "reconstruction"  # image grids logged as val/reconstruction
    selection = None  # no model selection and no test split: the export is the product
    val_whole_split = False  # a fixed sample of data.val_num_samples tracks the loss
    # Pre-training from an export (encoder only) starts a fresh decoder and mask token.
    init_new_prefixes = ("decoder_", "mask_fill.")
    init_unused_prefixes = ()

    def __init__(self, cfg):
        self.cfg = cfg
        self.seed = cfg.train.seed

    def restore_inference_state(self, info: dict) -> None:
        pass  # nothing beyond the weights: the MAE is built from its config alone

    def select_train_samples(self, table):
        return table  # every image: no labels needed

    def bind_data(self, info) -> None:
        pass  # the MAE needs nothing from the data beyond the image size in its config

    def build_model(self):
        return build_mae(self.cfg.model, self.cfg.mask)

    def param_groups(self, model, weight_decay: float) -> list[dict]:
        return param_groups(model, weight_decay)

    def fitted_state(self) -> dict:
        return {}

    def inference_state(self, fitted: dict) -> dict:
        return {}

    @staticmethod
    def _inputs(batch: dict, device, dtype):
        images = batch["image"].to(device, non_blocking=True).to(dtype)
        roi = batch.get("roi")
        roi = roi.to(device, non_blocking=True) if roi is not None else None
        return images, roi

    def begin_step(self, step: int, total_steps: int) -> None:
        pass  # one loss throughout

    def training_loss(self, model, batch, device, dtype):
        images, roi = self._inputs(batch, device, dtype)
        module = getattr(model, "module", model)
        noise = position_noise(batch["position"], module.num_patches, self.seed, NOISE_TRAIN).to(
            device, non_blocking=True
        )
        out = model(images, roi, noise)
        # Tensors stay on the device: the engine syncs them only on logging steps.
        return out.loss, out.stat_tensors

    @torch.no_grad()
    def evaluate(self, model, loader, device, dtype, fitted: dict | None = None) -> dict[str, float]:
        """Masked-patch loss on the held-out set with a fixed mask, next to a baseline that predicts
        every masked pixel as the mean of the image's visible pixels (same loss, same normalization).

        Sums are reduced over ranks; padded rows (weight 0) do not count.
        """
        module = getattr(model, "module", model)
        loss_sum = baseline_sum = weight_sum = 0.0
        was_training = module.training
        module.eval()
        for batch in loader:
            images, roi = self._inputs(batch, device, dtype)
            noise = position_noise(batch["position"], module.num_patches, self.seed, NOISE_VAL).to(device)
            out = model(images, roi, noise)
            baseline_pred = self._baseline_prediction(module, images, out.mask_BL)
            inside_BL = module.region(roi, images.shape[0], images.device)  # the loss's region weighting
            for i, w in enumerate(batch["weight"].tolist()):
                if w == 0:
                    continue
                sl = slice(i, i + 1)
                region = None if inside_BL is None else inside_BL[sl]
                image = images[sl].float()
                loss_sum += w * float(
                    module.loss_fn(out.pred_BLP[sl].float(), image, out.mask_BL[sl], region)
                )
                baseline_sum += w * float(module.loss_fn(baseline_pred[sl], image, out.mask_BL[sl], region))
                weight_sum += w
        module.train(was_training)
        loss_sum, baseline_sum, weight_sum = all_reduce_sum([loss_sum, baseline_sum, weight_sum], device)
        if weight_sum == 0:
            raise ValueError(
                "the validation split is empty: convert shards with a val split or set data.val_split"
            )
        return {
            "val_loss": loss_sum / weight_sum,
            "val_loss_baseline": baseline_sum / weight_sum,
            "val_num_samples": weight_sum,
        }

    @staticmethod
    def _baseline_prediction(module, images, mask_BL) -> torch.Tensor:
        """Each image's visible-pixel mean, painted everywhere, expressed in the loss's target space."""
        patches = module.patchify(images.float())  # (B, L, P)
        visible = (1 - mask_BL).unsqueeze(-1)  # (B, L, 1)
        mean_B = (patches * visible).sum((1, 2)) / (visible.sum((1, 2)) * patches.shape[-1]).clamp_min(1)
        constant = torch.ones_like(images, dtype=torch.float32) * mean_B.view(-1, 1, 1, 1)
        return module.target(constant)

    @torch.no_grad()
    def preview_image(self, model, loader, device, dtype, num_images: int = 4) -> np.ndarray | None:
        """Rows of [original | masked input | reconstruction] for the first validation images, uint8."""
        module = getattr(model, "module", model)
        batch = next(iter(loader), None)
        if batch is None:
            return None
        images, roi = self._inputs(batch, device, dtype)
        noise = position_noise(batch["position"], module.num_patches, self.seed, NOISE_VAL).to(device)
        was_training = module.training
        module.eval()
        out = model(images, roi, noise)
        module.train(was_training)
        images = images.float()
        target = module.patchify(images)
        pred = out.pred_BLP.float()
        if (
            self.cfg.model.norm_pix_loss
        ):  # back to pixel space with each patch's own statistics, as MAE shows it
            mean, var = target.mean(-1, keepdim=True), target.var(-1, keepdim=True)
            pred = pred * (var + 1e-6).sqrt() + mean
        mask = out.mask_BL.unsqueeze(-1)
        masked = module.unpatchify(target * (1 - mask) + target.amin() * mask)
        recon = module.unpatchify(target * (1 - mask) + pred * mask)
        rows = []
        for i in range(min(num_images, images.shape[0])):
            lo, hi = images[i].min(), images[i].max()
            tiles = [((t[i, 0] - lo) / (hi - lo + 1e-6)).clamp(0, 1) for t in (images, masked, recon)]
            rows.append(torch.cat(tiles, dim=1))
        grid = torch.cat(rows, dim=0)
        return (grid.cpu().numpy() * 255).round().astype(np.uint8)

    def flops_per_sample(self) -> float | None:
        flops = estimate_step_flops(self.cfg.model, self.cfg.mask, batch_size=1)
        return float(flops["total"])
