"""`xray-pretrain export --checkpoint DIR --out DIR`: a checkpoint's encoder (and a fine-tuned classifier's
head), consolidated (any ZeRO stage), as a timm model folder with a model card (the hierarchical stem,
which timm cannot express, keeps the project's own format; a `classify.pool=blocks` head, which timm
cannot express either, goes beside the encoder in its own file)."""

from __future__ import annotations

from pathlib import Path


def add_arguments(parser) -> None:
    parser.add_argument(
        "--checkpoint",
        required=True,
        type=Path,
        help="run folder (a classifier's best, else latest), checkpoints folder (latest) or step folder",
    )
    parser.add_argument("--out", required=True, type=Path)
    parser.add_argument("--dtype", default="fp32", choices=["fp32", "bf16"])  # export.EXPORT_PRECISIONS


def run(args) -> int:
    from xray_pretrain.inference import export_checkpoint

    summary = export_checkpoint(args.checkpoint, args.out, args.dtype)
    what = f"classifier ({summary['head']['num_classes']} labels)" if summary["head"] else "encoder"
    print(
        f"exported {summary['num_params']:,} {what} parameters ({summary['checkpoint_tag']}) to {args.out} "
        f"({summary['format']} format, model card README.md)"
    )
    if summary["format"] == "timm":
        print(f'load it: timm.create_model("local-dir:{args.out.resolve()}", pretrained=True)')
    if summary["head"] and summary["head"]["global_pool"] == "blocks":
        print(
            f"the head over every block's pooled tokens (no timm form): {summary['files'][-1]}, see README.md"
        )
    return 0
