"""Pure nn.Modules: 1-channel ViT encoder, fused attention, MAE with context-aware masking, costs.

Imports torch and the standard library only (nothing from engine/data/tasks, DeepSpeed or DALI).
"""

from .attention import (
    ATTN_BACKENDS,
    available_attention_backends,
    check_attention_backend,
    describe_attention_backend,
)
from .flops import (
    count_params,
    device_peak_flops,
    estimate_step_flops,
    estimate_train_memory_bytes,
    measure_matmul_tflops,
    mfu,
    suggest_batch_size,
)
from .heads import POOLS, ClassificationModel, block_pooled_features
from .mae import MAEConfig, MAEOutput, MaskedAutoencoder, build_encoder, build_mae, masked_patch_loss
from .masking import STRATEGIES, MaskConfig
from .stem import STEMS
from .vit import ENCODER_SIZES, ViTEncoder

__all__ = [
    "ATTN_BACKENDS",
    "POOLS",
    "ClassificationModel",
    "block_pooled_features",
    "build_encoder",
    "ENCODER_SIZES",
    "STEMS",
    "STRATEGIES",
    "MAEConfig",
    "MAEOutput",
    "MaskConfig",
    "MaskedAutoencoder",
    "ViTEncoder",
    "available_attention_backends",
    "build_mae",
    "check_attention_backend",
    "count_params",
    "describe_attention_backend",
    "device_peak_flops",
    "estimate_step_flops",
    "estimate_train_memory_bytes",
    "masked_patch_loss",
    "measure_matmul_tflops",
    "mfu",
    "suggest_batch_size",
]
