"""`xray-pretrain export --checkpoint DIR --out DIR`: a checkpoint's encoder, consolidated (any ZeRO stage)."""

from __future__ import annotations

from pathlib import Path


def add_arguments(parser) -> None:
    parser.add_argument(
        "--checkpoint", required=True, type=Path, help="checkpoints folder (uses latest) or one step folder"
    )
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])  # export.EXPORT_PRECISIONS


def run(args) -> int:
    from xray_pretrain.engine.export import export_encoder

    config = export_encoder(args.checkpoint, args.out, args.dtype)
    print(f"exported {config['num_params']:,} encoder parameters ({config['checkpoint_tag']}) to {args.out}")
    return 0
