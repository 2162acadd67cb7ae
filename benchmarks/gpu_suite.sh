#!/usr/bin/env bash
# MAE step benchmarks on one GPU, in one call of under 5 minutes (written for an H200):
#   ViT-B and ViT-L MAE at 1280 px / patch 16, bf16, batch from the analytic memory model
#   (models/flops.py: suggest_batch_size, capped), cells in priority order:
#   1. attn=auto for each model;  2. + activation checkpointing;  3. decoder heads 8x64 instead of 16x32;
#   4. every other attention backend present on the machine (flash, cudnn, efficient, math, flash_attn).
# Each cell is one `python -m xray_pretrain.bench.step` process under `timeout 40`; a failing or
# timed-out cell is recorded with its error and the suite goes on; once SUITE_BUDGET_S seconds have
# passed the remaining cells are recorded as skipped. Needs torch (+ timm only for the package import
# chain it does not use); run from anywhere:
#
#   benchmarks/gpu_suite.sh OUTDIR       -> OUTDIR/gpu_suite.md (also printed), cells.jsonl, device.json
#
# CPU dry run of the plumbing (tiny model):
#   SUITE_DEVICE=cpu SUITE_IMAGE=64 SUITE_PATCH=8 SUITE_MODELS=tiny SUITE_PRECISION=fp32 \
#   SUITE_EXTRA="--depth 1 --decoder-depth 1" benchmarks/gpu_suite.sh /tmp/suite
set -uo pipefail

OUT=${1:?usage: benchmarks/gpu_suite.sh OUTDIR}
mkdir -p "$OUT"
OUT=$(cd "$OUT" && pwd)
cd "$(dirname "$0")/.." || exit 2
export PYTHONPATH=".${PYTHONPATH:+:$PYTHONPATH}"
PY=${PYTHON:-python}
DEVICE=${SUITE_DEVICE:-cuda}
IMAGE=${SUITE_IMAGE:-1280}
PATCH=${SUITE_PATCH:-16}
MODELS=${SUITE_MODELS:-"base large"}
PRECISION=${SUITE_PRECISION:-bf16}
CELL_TIMEOUT=${SUITE_CELL_TIMEOUT:-40}
BUDGET_S=${SUITE_BUDGET_S:-250}
MAX_BATCH=${SUITE_MAX_BATCH:-32}
STEPS=${SUITE_STEPS:-6}
WARMUP=${SUITE_WARMUP:-2}
read -r -a EXTRA <<< "${SUITE_EXTRA:-}"
CELLS="$OUT/cells.jsonl"
: > "$CELLS"
START=$(date +%s)

# Device facts: name, measured bf16 matmul ceiling, attention backends this machine runs.
timeout "$CELL_TIMEOUT" "$PY" - "$DEVICE" > "$OUT/device.json" 2> "$OUT/device.err" <<'EOF'
import json, sys, torch
from xray_pretrain.models import available_attention_backends, device_peak_flops, measure_matmul_tflops
device = torch.device(sys.argv[1])
on_cuda = device.type == "cuda"
info = {
    "device": torch.cuda.get_device_name(device) if on_cuda else "cpu",
    "torch": torch.__version__,
    "backends": available_attention_backends((64, 32), device),
    "matmul_tflops_bf16": round(measure_matmul_tflops(device, torch.bfloat16, None if on_cuda else 512), 1),
    "datasheet_tflops_bf16": device_peak_flops(device, "bf16") / 1e12,
}
print(json.dumps(info))
EOF
if [[ ! -s "$OUT/device.json" ]]; then
    echo "device probe failed:" >&2
    tail -n 5 "$OUT/device.err" >&2
    echo '{"device": "unknown", "backends": ["auto"]}' > "$OUT/device.json"
fi
read -r -a BACKENDS <<< "$("$PY" -c 'import json,sys; print(" ".join(json.load(open(sys.argv[1]))["backends"]))' "$OUT/device.json")"
echo "device: $(cat "$OUT/device.json")"

record() {  # record NAME RC OUTFILE ERRFILE: append the cell's JSON (or its error) to cells.jsonl
    "$PY" - "$@" >> "$CELLS" <<'EOF'
import json, sys
name, rc, out_path, err_path = sys.argv[1], int(sys.argv[2]), sys.argv[3], sys.argv[4]
lines = [l for l in open(out_path).read().splitlines() if l.startswith("{")]
if rc == 0 and lines:
    cell = json.loads(lines[-1])
else:
    err = [l for l in open(err_path).read().splitlines() if l.strip()]
    reason = "timed out" if rc == 124 else (err[-1] if err else f"exit code {rc}")
    cell = {"error": reason[:300]}
cell["cell"] = name
print(json.dumps(cell))
EOF
}

run_cell() {  # run_cell NAME BENCH-ARGS...
    local name=$1
    shift
    local elapsed=$(( $(date +%s) - START ))
    if (( elapsed > BUDGET_S )); then
        echo "skip  $name (suite budget ${BUDGET_S}s spent)"
        printf '{"cell": "%s", "error": "skipped: suite time budget spent"}\n' "$name" >> "$CELLS"
        return
    fi
    timeout "$CELL_TIMEOUT" "$PY" -m xray_pretrain.bench.step --device "$DEVICE" --image-size "$IMAGE" \
        --patch "$PATCH" --precision "$PRECISION" --batch-size auto --max-batch-size "$MAX_BATCH" \
        --steps "$STEPS" --warmup "$WARMUP" "${EXTRA[@]}" "$@" > "$OUT/cell.out" 2> "$OUT/cell.err"
    local rc=$?
    record "$name" "$rc" "$OUT/cell.out" "$OUT/cell.err"
    if [[ $rc -ne 0 ]]; then
        echo "FAIL  $name (rc $rc): $(grep -v '^\s*$' "$OUT/cell.err" | tail -n 1)"
    else
        echo "ok    $name  $(tail -n 1 "$CELLS" | cut -c1-160)"
    fi
}

for model in $MODELS; do run_cell "$model auto" --model "$model" --attn auto; done
for model in $MODELS; do run_cell "$model auto +ckpt" --model "$model" --attn auto --grad-ckpt; done
for model in $MODELS; do run_cell "$model auto dec 8x64" --model "$model" --attn auto --decoder-heads 8; done
for backend in "${BACKENDS[@]}"; do
    [[ $backend == auto ]] && continue
    for model in $MODELS; do run_cell "$model $backend" --model "$model" --attn "$backend"; done
done

"$PY" - "$CELLS" "$OUT/device.json" "$OUT/gpu_suite.md" "$IMAGE" "$PATCH" "$PRECISION" <<'EOF'
import json, sys
cells_path, device_path, md_path, image, patch, precision = sys.argv[1:7]
device = json.load(open(device_path))
cells = [json.loads(l) for l in open(cells_path) if l.strip()]
rows = [
    f"# MAE step benchmark: {device.get('device')}, torch {device.get('torch')}",
    "",
    f"{image} px, patch {patch}, {precision}, mask 0.75, plain AdamW step; measured bf16 matmul "
    f"{device.get('matmul_tflops_bf16')} TFLOP/s, datasheet {device.get('datasheet_tflops_bf16')} TFLOP/s. "
    "TFLOP/s and MFU count model FLOPs only (no recomputation): see xray_pretrain/models/flops.py.",
    "",
    "| cell | attention kernel | batch | s/step | img/s | TFLOP/s | MFU | peak GiB |",
    "|---|---|---|---|---|---|---|---|",
]
for c in cells:
    if "error" in c:
        rows.append(f"| {c['cell']} | {c['error']} | | | | | | |")
        continue
    mfu = f"{c['mfu']:.1%}" if c.get("mfu") is not None else "n/a"
    rows.append(
        f"| {c['cell']} | {c['attn_backend']} | {c['batch_size']} | {c['s_per_step']:.3f} | {c['images_per_s']:.1f} "
        f"| {c['tflops']:.1f} | {mfu} | {c['peak_mem_mib'] / 1024:.1f} |"
    )
text = "\n".join(rows) + "\n"
open(md_path, "w").write(text)
print(text)
EOF
echo "suite took $(( $(date +%s) - START )) s; table in $OUT/gpu_suite.md"
