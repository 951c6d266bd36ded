#!/usr/bin/env bash
# Train rovit_jax on several GPU nodes of a SLURM cluster: writes an sbatch script that runs one
# `python -m rovit_jax.main` task per node (each owning all of its node's GPUs; JAX joins the tasks
# into one runtime from SLURM's variables) and submits it.
#
# The job script is built from single-quoted text: its $variables are meant to expand in the job.
# shellcheck disable=SC2016
set -euo pipefail

# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
    cat <<EOF
Usage: $PROG --config CONFIG --workdir DIR [options] [-- TRAINER_ARGS...]

Writes an sbatch script (to <log dir>/<job name>.sbatch) and submits it with sbatch.

Required:
  --config CONFIG        config file [:argument], relative to the directory this is run from
  --workdir DIR          checkpoints and metrics, on storage every node sees (shared FS or gs://)

Resources:
  --nodes N              number of nodes, one trainer process each (default: 1)
  --gpus-per-node G      GPUs per node, all owned by the node's process (default: 8)
  --cpus-per-task C      CPUs for each node's process (default: whole nodes, --exclusive)
  --partition NAME       partition
  --account NAME         account to charge
  --time LIMIT           time limit (e.g. 24:00:00 or 2-00:00:00)
  --job-name NAME        job name (default: rovit_jax)
  --sbatch-arg ARG       extra sbatch option for the script, e.g. --sbatch-arg=--qos=high
                         (repeatable)

Environment of the job:
  --venv DIR             virtualenv activated in the job (default: python3 from the job's PATH)
  --env KEY=VALUE        environment variable for the trainers (repeatable)
  --log-dir DIR          where slurm-<jobid>.out and the sbatch script go (default: --workdir;
                         required when --workdir is a URL such as gs://...)

Preemption:
  --requeue              on exit code 75 (stopped after a committed checkpoint) the job requeues
                         itself with scontrol requeue and resumes from the checkpoint
  --max-requeues N       stop requeueing after N restarts (default: 20)

  --dry-run              print the sbatch script and the commands (prefixed by "+ "); submit nothing
  -h, --help             this help
  -- ARGS...             passed on to rovit_jax.main (e.g. -- --config.total_steps=100)

The job asks SLURM for SIGTERM 120 s before its time limit (--signal=B:TERM@120) and passes it,
like a preemption's or scancel's SIGTERM, to the trainers: they finish the step, commit a checkpoint
and exit with code 75. To stop a job cleanly: scancel --batch --signal=TERM <jobid>.
EOF
}

NODES=1 GPUS_PER_NODE=8 CPUS_PER_TASK="" PARTITION="" ACCOUNT="" TIME_LIMIT="" JOB_NAME=rovit_jax
CONFIG="" WORKDIR="" VENV="" LOG_DIR="" MAX_REQUEUES=20
REQUEUE=0
ENVS=() SBATCH_ARGS=() PASSTHROUGH=()

while (($#)); do
    parse_flag "$@"
    case $FLAG in
        -h | --help)
            usage
            exit 0
            ;;
        --nodes) flag_value; NODES=$VALUE ;;
        --gpus-per-node) flag_value; GPUS_PER_NODE=$VALUE ;;
        --cpus-per-task) flag_value; CPUS_PER_TASK=$VALUE ;;
        --partition) flag_value; PARTITION=$VALUE ;;
        --account) flag_value; ACCOUNT=$VALUE ;;
        --time) flag_value; TIME_LIMIT=$VALUE ;;
        --job-name) flag_value; JOB_NAME=$VALUE ;;
        --sbatch-arg)
            flag_value
            SBATCH_ARGS+=("$VALUE")
            ;;
        --config) flag_value; CONFIG=$VALUE ;;
        --workdir) flag_value; WORKDIR=$VALUE ;;
        --venv) flag_value; VENV=$VALUE ;;
        --env)
            flag_value
            check_env_assignment "$VALUE" --env
            ENVS+=("$VALUE")
            ;;
        --log-dir) flag_value; LOG_DIR=$VALUE ;;
        --requeue) flag_switch; REQUEUE=1 ;;
        --max-requeues) flag_value; MAX_REQUEUES=$VALUE ;;
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
check_positive_int "$NODES" --nodes
check_positive_int "$GPUS_PER_NODE" --gpus-per-node
if [[ -n $CPUS_PER_TASK ]]; then
    check_positive_int "$CPUS_PER_TASK" --cpus-per-task
fi
if [[ ! $MAX_REQUEUES =~ ^[0-9]+$ ]]; then
    usage_error "--max-requeues must be a non-negative integer, got '$MAX_REQUEUES'"
fi
# Values written into #SBATCH lines, which sbatch reads without shell quoting: keep them plain.
if [[ ! $JOB_NAME =~ ^[A-Za-z0-9_.-]+$ ]]; then
    usage_error "--job-name may only hold letters, digits, '_', '.' and '-', got '$JOB_NAME'"
fi
if [[ -n $PARTITION && ! $PARTITION =~ ^[A-Za-z0-9_.,-]+$ ]]; then
    usage_error "--partition must be a partition name (or a comma list), got '$PARTITION'"
fi
if [[ -n $ACCOUNT && ! $ACCOUNT =~ ^[A-Za-z0-9_.-]+$ ]]; then
    usage_error "--account must be an account name, got '$ACCOUNT'"
fi
TIME_FORMAT='^([0-9]+(-[0-9]+)?(:[0-9]+){0,2}|UNLIMITED|INFINITE|unlimited|infinite)$'
if [[ -n $TIME_LIMIT && ! $TIME_LIMIT =~ $TIME_FORMAT ]]; then
    usage_error "--time must be a SLURM time limit such as 24:00:00 or 2-00:00:00," \
        "got '$TIME_LIMIT'"
fi
for arg in ${SBATCH_ARGS[@]+"${SBATCH_ARGS[@]}"}; do
    if [[ $arg != --?* || $arg == *[[:space:]]* ]]; then
        usage_error "--sbatch-arg takes one sbatch option without spaces," \
            "e.g. --sbatch-arg=--qos=high; got '$arg'"
    fi
done
if [[ -z $LOG_DIR ]]; then
    if [[ $WORKDIR == *://* ]]; then
        usage_error "--workdir '$WORKDIR' is not a local path: pass --log-dir for slurm-<jobid>.out"
    fi
    LOG_DIR=$WORKDIR
fi
if [[ $LOG_DIR == *[[:space:]]* ]]; then
    usage_error "--log-dir (or --workdir) must not contain spaces" \
        "(#SBATCH --output cannot quote them), got '$LOG_DIR'"
fi
# The job runs in the directory this is run from; absolute paths keep the script valid anywhere.
if [[ $LOG_DIR != /* ]]; then
    LOG_DIR="$PWD/${LOG_DIR#./}"
fi
LOG_DIR=${LOG_DIR%/}
if [[ $PWD == *[[:space:]]* ]]; then
    die "run from a directory without spaces: it becomes the job's #SBATCH --chdir ($PWD)"
fi
SCRIPT_FILE="$LOG_DIR/$JOB_NAME.sbatch"

job_script() {
    local lines=() env python=python3 ids="" i
    lines+=(
        '#!/usr/bin/env bash'
        "#SBATCH --job-name=$JOB_NAME"
        "#SBATCH --nodes=$NODES"
        '#SBATCH --ntasks-per-node=1'
        "#SBATCH --gpus-per-node=$GPUS_PER_NODE"
    )
    if [[ -n $CPUS_PER_TASK ]]; then
        lines+=("#SBATCH --cpus-per-task=$CPUS_PER_TASK")
    else
        lines+=('#SBATCH --exclusive')
    fi
    if [[ -n $PARTITION ]]; then lines+=("#SBATCH --partition=$PARTITION"); fi
    if [[ -n $ACCOUNT ]]; then lines+=("#SBATCH --account=$ACCOUNT"); fi
    if [[ -n $TIME_LIMIT ]]; then lines+=("#SBATCH --time=$TIME_LIMIT"); fi
    lines+=(
        "#SBATCH --chdir=$PWD"
        "#SBATCH --output=$LOG_DIR/slurm-%j.out"
        '#SBATCH --open-mode=append'
        '#SBATCH --signal=B:TERM@120'
    )
    if ((REQUEUE)); then lines+=('#SBATCH --requeue'); else lines+=('#SBATCH --no-requeue'); fi
    for i in ${SBATCH_ARGS[@]+"${SBATCH_ARGS[@]}"}; do
        lines+=("#SBATCH $i")
    done
    lines+=(
        '#'
        "# Generated by launch/$PROG: one rovit_jax.main process per node, owning the node's GPUs."
    )
    if [[ -n $VENV ]]; then
        lines+=('# shellcheck source=/dev/null' "source $(shell_quote "${VENV%/}/bin/activate")")
        python=python
    fi
    lines+=('set -uo pipefail')
    for ((i = 0; i < GPUS_PER_NODE; i++)); do
        ids+="${ids:+,}$i"
    done
    lines+=(
        "# JAX's SLURM detection would give each task only GPU <SLURM_LOCALID>;"
        "# this task owns them all."
        "export JAX_LOCAL_DEVICE_IDS=$ids"
        'export PYTHONUNBUFFERED=1'
    )
    for env in ${ENVS[@]+"${ENVS[@]}"}; do
        lines+=("$(export_statement "$env")")
    done
    trainer_args "$CONFIG" "$WORKDIR" ${PASSTHROUGH[@]+"${PASSTHROUGH[@]}"}
    # Whole nodes (--exclusive): the task gets every CPU of its node (a step's task otherwise gets
    # one), read from SLURM_CPUS_ON_NODE in the job.
    local cpus='--cpus-per-task="$SLURM_CPUS_ON_NODE"'
    if [[ -n $CPUS_PER_TASK ]]; then
        cpus=$(shell_quote "--cpus-per-task=$CPUS_PER_TASK")
    fi
    # --kill-on-bad-exit=0: else the first task to exit 75 would get the others killed before they
    # report 75 too; JAX's heartbeat already stops the rest when one really fails.
    local srun_line
    srun_line="$(quote_cmd srun --ntasks-per-node=1 "--gpus-per-node=$GPUS_PER_NODE") $cpus"
    srun_line+=" $(quote_cmd --kill-on-bad-exit=0 "$python" "${TRAINER_ARGS[@]}")"
    lines+=(
        'echo "[rovit_jax] job ${SLURM_JOB_ID:-?} (restart ${SLURM_RESTART_COUNT:-0})'\
' on ${SLURM_JOB_NODELIST:-?}"'
        '# SIGTERM reaches this shell (--signal=B:..., preemption, scancel --batch): srun passes'
        '# it on to every task, which checkpoints and exits with code 75. The trap is set before'
        '# srun starts, so no signal can fall between the two.'
        'signalled=0'
        'srun_pid=""'
        'pending=0'
        '# shellcheck disable=SC2317,SC2329  # run by the trap below'
        'on_term() {'
        '    signalled=1'
        '    if [ -z "$srun_pid" ]; then pending=1; return; fi'
        '    echo "[rovit_jax] SIGTERM: asking the trainers to checkpoint and stop"'
        '    kill -TERM "$srun_pid" 2>/dev/null'
        '}'
        'trap on_term TERM'
        "$srun_line &"
        'srun_pid=$!'
        'if [ "$pending" = 1 ]; then on_term; fi'
        'while :; do'
        '    signalled=0'
        '    status=0'
        '    wait "$srun_pid" || status=$?'
        '    if [ "$signalled" = 0 ]; then break; fi'
        '    if kill -0 "$srun_pid" 2>/dev/null; then continue; fi'
        '    # srun ended just as the signal came: collect its status.'
        '    status=0'
        '    wait "$srun_pid" || status=$?'
        '    break'
        'done'
        'echo "[rovit_jax] trainers exited with code $status"'
        "if [ \"\$status\" -eq $PREEMPTED_EXIT_CODE ]; then"
    )
    # Messages are quoted whole: the script's path may hold any character.
    local resume done="[rovit_jax] stopped after a committed checkpoint"
    resume="resume with: sbatch $(shell_quote "$SCRIPT_FILE")"
    if ((REQUEUE)); then
        lines+=(
            "    if [ \"\${SLURM_RESTART_COUNT:-0}\" -lt $MAX_REQUEUES ]; then"
            "        echo $(shell_quote "$done: requeueing")"
            '        scontrol requeue "$SLURM_JOB_ID" && exit 0'
            "        echo $(shell_quote "[rovit_jax] scontrol requeue failed; $resume")"
            '    else'
            "        echo $(shell_quote "$done; requeued $MAX_REQUEUES times already, $resume")"
            '    fi'
        )
    else
        lines+=("    echo $(shell_quote "$done; $resume")")
    fi
    lines+=('fi' 'exit "$status"')
    printf '%s\n' "${lines[@]}"
}

SCRIPT=$(job_script)
if ((DRY_RUN)); then
    printf '# sbatch script %s:\n' "$SCRIPT_FILE"
    printf '%s\n' "$SCRIPT"
    printf '# end of sbatch script\n'
    run mkdir -p "$LOG_DIR"
    run sbatch "$SCRIPT_FILE"
    exit 0
fi

run mkdir -p "$LOG_DIR"
printf '%s\n' "$SCRIPT" >"$SCRIPT_FILE"
note "wrote $SCRIPT_FILE"
run sbatch "$SCRIPT_FILE"
