# Sourced by every slurm/*.sbatch script: what all cluster stages share, in one place.
#
# Layout: srun starts one task per GPU (or one CPU rank per task on a node without GPUs); each task
# finds its rank in Slurm's variables (xray_pretrain/engine/dist.py). Preemption: Slurm signals the
# batch shell (`--signal=B:USR1@120`, or SIGTERM); the shell forwards USR1 to every task, the ranks
# agree at the next optimizer step, save a checkpoint and exit; the shell then requeues the job, which
# resumes from that checkpoint (`checkpoint.resume=auto`). Whatever the tasks print goes to the job's
# output file, appended across restarts (`--open-mode=append`).

set -uo pipefail

PREEMPTED_EXIT_CODE=75  # xray_pretrain.engine.preempt.PREEMPTED_EXIT_CODE

xray_log() {
    echo "[slurm $(date -u +%FT%TZ)] $*"
}

# The command named by $1 must be on PATH (sbatch exports the submitting shell's environment).
xray_require() {
    if ! command -v "$1" >/dev/null; then
        xray_log "error: $1 not found on PATH; activate the project's environment before sbatch"
        exit 2
    fi
}

# Print where and how this start runs (a requeued job logs one such line per start).
xray_banner() {
    # sbatch exports the submitting shell's environment: rank variables a launcher or an earlier
    # one-process run left there would override Slurm's own and point every task at a stale
    # rendezvous. Each task derives them from SLURM_* (xray_pretrain/engine/dist.py).
    unset RANK WORLD_SIZE LOCAL_RANK LOCAL_WORLD_SIZE LOCAL_SIZE MASTER_ADDR MASTER_PORT CROSS_RANK CROSS_SIZE
    export PYTHONUNBUFFERED=1
    export OMP_NUM_THREADS="${OMP_NUM_THREADS:-${SLURM_CPUS_PER_TASK:-1}}"
    xray_log "job ${SLURM_JOB_ID} start $((${SLURM_RESTART_COUNT:-0} + 1)) on ${SLURM_JOB_NODELIST}:" \
        "${SLURM_NTASKS} tasks, ${SLURM_GPUS_ON_NODE:-0} GPUs per node, OMP_NUM_THREADS=${OMP_NUM_THREADS}"
}

# A preemption signal may come at any time, even before srun starts: from here on it is recorded.
XRAY_PREEMPTED=0
XRAY_STEP_PID=""
xray_on_preempt() {
    XRAY_PREEMPTED=1
    xray_log "preemption signal: the tasks stop at their next step boundary"
    # USR1 for TERM too: srun would cancel the step on TERM instead of passing it on.
    if [[ -n $XRAY_STEP_PID ]]; then kill -USR1 "$XRAY_STEP_PID" 2>/dev/null; fi
}
trap xray_on_preempt USR1 TERM

xray_requeue() {
    xray_log "requeueing job ${SLURM_JOB_ID}: $1"
    # Refused (and harmless) when the job is already requeued or was cancelled by scancel.
    scontrol requeue "${SLURM_JOB_ID}" || xray_log "requeue refused: the job was already requeued, or cancelled"
}

# srun "$@" with preemption handling; returns the step's exit status.
xray_srun() {
    local rc=0
    if [[ $XRAY_PREEMPTED -eq 1 ]]; then
        xray_requeue "preempted before the step started"
        return "$PREEMPTED_EXIT_CODE"
    fi
    srun --kill-on-bad-exit=1 "$@" &
    XRAY_STEP_PID=$!
    # `wait` returns early whenever a trapped signal arrives: wait again until srun is gone.
    while kill -0 "$XRAY_STEP_PID" 2>/dev/null; do
        wait "$XRAY_STEP_PID"
        rc=$?
    done
    XRAY_STEP_PID=""
    # srun reports 143 rather than 75 when --kill-on-bad-exit ends the slower ranks: the shell's own
    # record of the signal decides, the exit code only where the signal reached the tasks directly.
    if [[ $rc -ne 0 ]] && [[ $XRAY_PREEMPTED -eq 1 || $rc -eq $PREEMPTED_EXIT_CODE ]]; then
        xray_requeue "the step stopped on preemption (exit ${rc})"
    fi
    return "$rc"
}

# One training stage (`pretrain`, `finetune`) on every task: xray_train COMMAND --config FILE [k=v ...]
xray_train() {
    xray_require xray-pretrain
    xray_banner
    xray_srun xray-pretrain "$@" checkpoint.resume=auto
}

# `xray-shard convert ARGS` split over the tasks (each writes its share of the planned shards), then
# one process that finds every shard written and writes manifest.json, skipped.jsonl and id_map.csv.
xray_shard() {
    xray_require xray-shard
    xray_banner
    # shellcheck disable=SC2016  # $SLURM_PROCID expands inside each task
    xray_srun bash -c 'exec xray-shard convert "$@" --part "${SLURM_PROCID}/${SLURM_NTASKS}"' xray-shard "$@" \
        || return $?
    xray_log "all parts written; writing the manifest"
    xray-shard convert "$@"
}
