#!/usr/bin/env bash
# Train rovit_jax on one machine with several GPUs: a single process that sees all of them (JAX
# uses every visible GPU as a device; a config mesh of `data: -1` spreads the batch over them).
set -euo pipefail

# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
    cat <<EOF
Usage: $PROG --config CONFIG --workdir DIR [options] [-- TRAINER_ARGS...]

Runs python -m rovit_jax.main as one process over the machine's GPUs.

Required:
  --config CONFIG         config file [:argument] (e.g. configs/shapes_pretrain.py)
  --workdir DIR           checkpoints and metrics (local path or gs://)

Options:
  --gpus LIST             GPUs to use, e.g. 0,1,2,3 (sets CUDA_VISIBLE_DEVICES; default: all)
  --venv DIR              run the virtualenv DIR's python
  --install               create DIR (--venv) and install this checkout and jax[cuda12] into it
  --python PYTHON         interpreter that runs the trainer without --venv, or that creates the
                          virtualenv with --install (default: python3; needs Python >= 3.11)
  --xla-mem-fraction F    fraction of each GPU's memory JAX preallocates, 0 < F <= 1
                          (sets XLA_PYTHON_CLIENT_MEM_FRACTION; JAX's default is 0.75)
  --env KEY=VALUE         extra environment variable for the trainer (repeatable)
  --dry-run               print every command (one per line, prefixed by "+ ") and run nothing
  -h, --help              this help
  -- ARGS...              passed on to rovit_jax.main (e.g. -- --config.total_steps=100)

Ctrl-C or SIGTERM/SIGHUP to this script is passed to the trainer once: it finishes its step,
commits a checkpoint and exits with code 75 (a second Ctrl-C stops it at once). This script exits
with the trainer's code; on 75 it prints the command that resumes the run.
EOF
}

CONFIG="" WORKDIR="" GPUS="" VENV="" MEM_FRACTION="" BASE_PYTHON=python3
INSTALL=0
ENVS=() PASSTHROUGH=()
ORIGINAL_ARGS=("$@")

while (($#)); do
    parse_flag "$@"
    case $FLAG in
        -h | --help)
            usage
            exit 0
            ;;
        --config) flag_value; CONFIG=$VALUE ;;
        --workdir) flag_value; WORKDIR=$VALUE ;;
        --gpus) flag_value; GPUS=$VALUE ;;
        --venv) flag_value; VENV=$VALUE ;;
        --install) flag_switch; INSTALL=1 ;;
        --python) flag_value; BASE_PYTHON=$VALUE ;;
        --xla-mem-fraction) flag_value; MEM_FRACTION=$VALUE ;;
        --env)
            flag_value
            check_env_assignment "$VALUE" --env
            ENVS+=("$VALUE")
            ;;
        --dry-run) flag_switch; DRY_RUN=1 ;;
        --)
            shift
            PASSTHROUGH=("$@")
            break
            ;;
        *) unknown_flag ;;
    esac
    shift "$SHIFT_BY"
done

require_flag "$CONFIG" --config
require_flag "$WORKDIR" --workdir
if [[ -n $GPUS && ! $GPUS =~ ^[0-9]+(,[0-9]+)*$ ]]; then
    usage_error "--gpus must be a comma-separated list of GPU indices such as 0,1,2,3, got '$GPUS'"
fi
if [[ -n $MEM_FRACTION ]] && ! [[ $MEM_FRACTION =~ ^(0?\.[0-9]*[1-9][0-9]*|1(\.0*)?)$ ]]; then
    usage_error "--xla-mem-fraction must be a number in (0, 1], got '$MEM_FRACTION'"
fi
if ((INSTALL)) && [[ -z $VENV ]]; then
    usage_error "--install needs --venv DIR (the virtualenv to create and install into)"
fi

PYTHON=$BASE_PYTHON
if [[ -n $VENV ]]; then
    PYTHON="${VENV%/}/bin/python"
fi

if ((INSTALL)); then
    # Creating over an existing virtualenv keeps its packages; pip then upgrades what changed.
    run "$BASE_PYTHON" -m venv "$VENV"
    run "$PYTHON" -m pip install --upgrade pip
    # The package pins the jax version; jax[cuda12] adds the CUDA plugin of that version.
    run "$PYTHON" -m pip install "$REPO_ROOT" "jax[cuda12]"
elif [[ -n $VENV && ! -x $PYTHON ]] && ((!DRY_RUN)); then
    die "no python in --venv $VENV ($PYTHON); pass --install to create it"
fi

ENV_ASSIGNMENTS=()
if [[ -n $GPUS ]]; then
    ENV_ASSIGNMENTS+=("CUDA_VISIBLE_DEVICES=$GPUS")
fi
if [[ -n $MEM_FRACTION ]]; then
    ENV_ASSIGNMENTS+=("XLA_PYTHON_CLIENT_MEM_FRACTION=$MEM_FRACTION")
fi
if ((${#ENVS[@]})); then
    ENV_ASSIGNMENTS+=("${ENVS[@]}")
fi
trainer_args "$CONFIG" "$WORKDIR" ${PASSTHROUGH[@]+"${PASSTHROUGH[@]}"}
TRAIN_CMD=("$PYTHON" "${TRAINER_ARGS[@]}")
if ((${#ENV_ASSIGNMENTS[@]})); then
    TRAIN_CMD=(env "${ENV_ASSIGNMENTS[@]}" "${TRAIN_CMD[@]}")
fi

if ((DRY_RUN)); then
    trace "${TRAIN_CMD[@]}"
    exit 0
fi

FORWARDED=0
TRAIN_PID=""
PENDING_SIGNAL=""
# shellcheck disable=SC2317,SC2329  # invoked by the traps below
forward() {
    SIGNALLED=1
    if [[ -z "$TRAIN_PID" ]]; then
        PENDING_SIGNAL=$1 # before the trainer's pid is known: passed on right after
        return
    fi
    FORWARDED=$((FORWARDED + 1))
    if ((FORWARDED == 1)); then
        note "$1: asking the trainer to checkpoint and stop (exit code $PREEMPTED_EXIT_CODE)"
    fi
    kill "-$1" "$TRAIN_PID" 2>/dev/null || true
}

# The trainer runs as its own job (set -m), so a Ctrl-C at the terminal reaches only this script
# and is passed on exactly once per press (the trainer takes a second SIGINT as "stop now").
# The traps are set before the trainer starts, so no signal can fall between the two.
trace "${TRAIN_CMD[@]}"
trap 'forward INT' INT
trap 'forward TERM' TERM
trap 'forward TERM' HUP
set -m
"${TRAIN_CMD[@]}" &
TRAIN_PID=$!
set +m
if [[ -n "$PENDING_SIGNAL" ]]; then
    forward "$PENDING_SIGNAL"
fi
wait_for_child "$TRAIN_PID"
STATUS=$CHILD_STATUS
trap - INT TERM HUP

if ((STATUS == PREEMPTED_EXIT_CODE)); then
    note "training stopped after a committed checkpoint (exit code $STATUS); to resume, rerun:"
    printf '  %s\n' "$(quote_cmd "$0" ${ORIGINAL_ARGS[@]+"${ORIGINAL_ARGS[@]}"})" >&2
fi
exit "$STATUS"
