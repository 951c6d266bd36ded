#!/usr/bin/env bash
# Train rovit_jax on a Cloud TPU VM (one host or a pod slice) with `gcloud compute tpus tpu-vm`:
# find or create the VM, install the package on every worker, run `python -m rovit_jax.main` on
# all workers at once (JAX joins them into one runtime by itself) and stream their logs.
#
# Scripts for the workers are built from single-quoted text: their $variables are meant to expand
# there, not here.
# shellcheck disable=SC2016
set -euo pipefail

# shellcheck source-path=SCRIPTDIR source=common.sh
source "$(dirname "${BASH_SOURCE[0]}")/common.sh"

usage() {
    cat <<EOF
Usage: $PROG --name NAME --zone ZONE --config CONFIG --workdir DIR [options] [-- TRAINER_ARGS...]
       $PROG --name NAME --zone ZONE --stop

Runs python -m rovit_jax.main on every worker of a Cloud TPU VM (pod slice) with the same config
and workdir, streaming the workers' logs (each line prefixed with [worker N]).

Required:
  --name NAME          TPU VM name
  --zone ZONE          its zone (e.g. us-central2-b)
  --config CONFIG      config file [:argument], a path inside the source checkout
                       (e.g. configs/vit_b16_224_pretrain.py:batch=16384)
  --workdir DIR        checkpoints and metrics; a gs:// path shared by all workers

The VM:
  --project PROJECT    Google Cloud project (default: gcloud's configured project)
  --create             create the VM when it does not exist (or recreate it when preempted);
                       without --create a missing VM is an error
  --accelerator TYPE   accelerator type, needed with --create (e.g. v4-32, v5p-64, v6e-16)
  --version VERSION    TPU software version for --create (default by accelerator:
                       v6e: v2-alpha-tpuv6e, v5p: v2-alpha-tpuv5, v5e: v2-alpha-tpuv5-lite,
                       otherwise tpu-ubuntu2204-base)
  --spot               create a Spot VM
  --preemptible        create a preemptible VM
  --delete-after       delete the VM once the trainers have exited (needs a gs:// workdir)
  --internal-ip        reach the workers by their internal IP (ssh/scp --internal-ip)

Software on the workers (source in ~/rovit_jax, virtualenv in ~/rovit_venv):
  --source SOURCE      what to install: a git URL (git+URL[@REF], URL.git[@REF] or git@...) to
                       clone, or a pip requirement (then the local configs/ is copied along);
                       default: this checkout's HEAD packed with git archive (uncommitted
                       changes are not included)
  --jax-extra EXTRA    installs jax[EXTRA] next to the package (default: tpu)
  --python PYTHON      interpreter for the virtualenv, installed with apt when missing
                       (default: python3.11; the package needs Python >= 3.11)
  --no-install         skip installing (the workers already have this source)
  --env KEY=VALUE      environment variable for the trainers (repeatable)

Control:
  --stop               send SIGTERM to the trainer on every worker and return: the trainers
                       finish their step, commit a checkpoint and exit with code 75
  --dry-run            print every command (one per line, prefixed by "+ ") and run nothing
  -h, --help           this help
  -- ARGS...           passed on to rovit_jax.main (e.g. -- --config.total_steps=100)

Ctrl-C (or SIGTERM/SIGHUP to this script) sends SIGTERM to the trainer on every worker and keeps
streaming until they have checkpointed and exited; a second Ctrl-C stops streaming at once. The
trainers do not depend on the ssh connection: if it drops they go on (see ~/.rovit_jax/train.log on
each worker) and --stop stops them. Exit code 75 = preempted after a checkpoint: rerun the same
command to resume (with --create when the VM itself was preempted).
EOF
}

NAME="" ZONE="" PROJECT="" ACCELERATOR="" VERSION="" CAPACITY="" CONFIG="" WORKDIR="" SOURCE=""
JAX_EXTRA=tpu PYTHON=python3.11
CREATE=0 DELETE_AFTER=0 STOP=0 INSTALL=1 INTERNAL_IP=0
ENVS=() PASSTHROUGH=()

while (($#)); do
    parse_flag "$@"
    case $FLAG in
        -h | --help)
            usage
            exit 0
            ;;
        --name) flag_value; NAME=$VALUE ;;
        --zone) flag_value; ZONE=$VALUE ;;
        --project) flag_value; PROJECT=$VALUE ;;
        --accelerator) flag_value; ACCELERATOR=$VALUE ;;
        --version) flag_value; VERSION=$VALUE ;;
        --spot | --preemptible)
            flag_switch
            if [[ -n $CAPACITY && $CAPACITY != "$FLAG" ]]; then
                usage_error "$CAPACITY and $FLAG exclude each other"
            fi
            CAPACITY=$FLAG
            ;;
        --config) flag_value; CONFIG=$VALUE ;;
        --workdir) flag_value; WORKDIR=$VALUE ;;
        --source) flag_value; SOURCE=$VALUE ;;
        --jax-extra) flag_value; JAX_EXTRA=$VALUE ;;
        --python) flag_value; PYTHON=$VALUE ;;
        --env)
            flag_value
            check_env_assignment "$VALUE" --env
            ENVS+=("$VALUE")
            ;;
        --create) flag_switch; CREATE=1 ;;
        --delete-after) flag_switch; DELETE_AFTER=1 ;;
        --stop) flag_switch; STOP=1 ;;
        --no-install) flag_switch; INSTALL=0 ;;
        --internal-ip) flag_switch; INTERNAL_IP=1 ;;
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

require_flag "$NAME" --name
require_flag "$ZONE" --zone
# TPU names are lowercase letters, digits and hyphens; also keeps NAME:path in scp unambiguous.
if [[ ! $NAME =~ ^[a-z]([-a-z0-9]*[a-z0-9])?$ ]]; then
    usage_error "--name must be lowercase letters, digits and hyphens, starting with a letter;" \
        "got '$NAME'"
fi
if ((STOP)); then
    if ((DELETE_AFTER)); then
        usage_error "--stop cannot be combined with --delete-after" \
            "(the trainers need the VM to checkpoint)"
    fi
else
    require_flag "$CONFIG" --config
    require_flag "$WORKDIR" --workdir
fi
if [[ ! $JAX_EXTRA =~ ^[A-Za-z0-9_,-]+$ ]]; then
    usage_error "--jax-extra must be an extra name such as tpu, got '$JAX_EXTRA'"
fi
if [[ ! $PYTHON =~ ^[A-Za-z0-9_./-]+$ ]]; then
    usage_error "--python must be an interpreter name or path such as python3.11, got '$PYTHON'"
fi
if ((CREATE)) && [[ -z $ACCELERATOR ]]; then
    usage_error "--create needs --accelerator (e.g. --accelerator=v4-32)"
fi
if ((DELETE_AFTER)) && [[ $WORKDIR != gs://* ]]; then
    usage_error "--delete-after needs a gs:// --workdir: checkpoints on the VM's disks would be" \
        "deleted with it (got '$WORKDIR')"
fi
if [[ -n $WORKDIR && $WORKDIR != gs://* ]]; then
    note "warning: --workdir '$WORKDIR' is not a gs:// path; on a pod slice every worker must" \
        "see the same workdir"
fi

default_version() {
    case $1 in
        v6e*) echo v2-alpha-tpuv6e ;;
        v5p*) echo v2-alpha-tpuv5 ;;
        v5litepod* | v5e*) echo v2-alpha-tpuv5-lite ;;
        *) echo tpu-ubuntu2204-base ;;
    esac
}
if [[ -z $VERSION ]]; then
    VERSION=$(default_version "$ACCELERATOR")
fi

# --config names a file in the checkout the workers run from (~/rovit_jax): a local path into this
# checkout is rewritten relative to it, so the launcher can be started from any directory.
remote_config() {
    local spec=$1 path arg="" dir abs
    path=${spec%%:*}
    if [[ $spec == *:* ]]; then
        arg=":${spec#*:}"
    fi
    if [[ -f $path ]]; then
        if [[ $path == */* ]]; then dir=${path%/*}; else dir=.; fi
        abs="$(cd "$dir" && pwd -P)/${path##*/}"
        case $abs in
            "$(cd "$REPO_ROOT" && pwd -P)"/*)
                printf '%s' "${abs#"$(cd "$REPO_ROOT" && pwd -P)/"}$arg"
                return 0
                ;;
        esac
    fi
    printf '%s' "$spec"
}

GCLOUD=(gcloud compute tpus tpu-vm)
WHERE=("--zone=$ZONE")
if [[ -n $PROJECT ]]; then
    WHERE+=("--project=$PROJECT")
fi
ALL_WORKERS=(--worker=all)
if ((INTERNAL_IP)); then
    ALL_WORKERS+=(--internal-ip)
fi

# on_workers SCRIPT: runs the one-line bash SCRIPT on every worker, in parallel.
on_workers() {
    run "${GCLOUD[@]}" ssh "$NAME" "${WHERE[@]}" "${ALL_WORKERS[@]}" \
        "--command=bash -c $(shell_quote "$1")"
}

# --- scripts run on the workers (one line each: they appear on the traced command line) ---------
STATE_DIR='"$HOME/.rovit_jax"'
VENV_PY='"$HOME/rovit_venv/bin/python"'
# Worker index from the metadata server (as in TPU VM tooling), else the host name.
PRELUDE=(
    "state_dir=$STATE_DIR"
    'worker=$(curl -sf --connect-timeout 2 -m 5 -H Metadata-Flavor:Google'\
' http://metadata.google.internal/computeMetadata/v1/instance/attributes/agent-worker-number'\
' 2>/dev/null || hostname)'
    # The trainer's pid if it is still running (the pid file may be stale after a reboot).
    'trainer_pid() { local pid; pid=$(cat "$state_dir/trainer.pid" 2>/dev/null) || return 1;'\
' tr "\0" " " < "/proc/$pid/cmdline" 2>/dev/null | grep -q "rovit_jax[.]main" || return 1;'\
' echo "$pid"; }'
)
NOT_RUNNING='if pid=$(trainer_pid); then echo "[worker $worker] a trainer is already running'\
' (pid $pid): stop it with --stop, or watch ~/.rovit_jax/train.log" >&2; exit 1; fi'

stop_script() {
    join_statements "${PRELUDE[@]}" \
        'if pid=$(trainer_pid); then kill -TERM "$pid" && echo "[worker $worker] sent SIGTERM to'\
' the trainer (pid $pid): it checkpoints and exits with code 75"; else echo "[worker $worker]'\
' no trainer running"; fi'
}

# SOURCE_KIND: local (git archive of this checkout), git (clone) or pip (a requirement).
GIT_URL="" GIT_REF=""
if [[ -z $SOURCE ]]; then
    SOURCE_KIND=local
elif [[ $SOURCE == git+* || $SOURCE == git@* || $SOURCE == *.git || $SOURCE == *.git@* ]]; then
    SOURCE_KIND=git
    GIT_URL=${SOURCE#git+}
    if [[ $GIT_URL == *.git@* ]]; then
        GIT_REF=${GIT_URL##*.git@}
        GIT_URL=${GIT_URL%@"$GIT_REF"}
    fi
else
    SOURCE_KIND=pip
fi

install_script() {
    local py pkg steps apt get_python
    py=$(shell_quote "$PYTHON")
    pkg='"$HOME/rovit_jax"'
    # Fresh TPU VMs often run unattended upgrades: wait for the dpkg lock instead of failing.
    apt='sudo DEBIAN_FRONTEND=noninteractive apt-get -o DPkg::Lock::Timeout=600'
    get_python="if ! command -v $py >/dev/null; then $apt update -qq"
    get_python+=" && $apt install -y -qq $py $(shell_quote "$PYTHON-venv"); fi"
    steps=(
        'set -eu' "${PRELUDE[@]}" "$NOT_RUNNING" "$get_python"
        "$py -m venv \"\$HOME/rovit_venv\""
        "$VENV_PY -m pip install -q --upgrade pip"
        'rm -rf "$HOME/rovit_jax"'
    )
    case $SOURCE_KIND in
        local)
            steps+=(
                'tar -xzf "$HOME/rovit_jax.tar.gz" -C "$HOME"'
                'rm -f "$HOME/rovit_jax.tar.gz"'
            )
            ;;
        git)
            steps+=("git clone -q $(shell_quote "$GIT_URL") \"\$HOME/rovit_jax\"")
            if [[ -n $GIT_REF ]]; then
                steps+=("git -C \"\$HOME/rovit_jax\" checkout -q $(shell_quote "$GIT_REF")")
            fi
            ;;
        pip)
            steps+=('mkdir -p "$HOME/rovit_jax"')
            pkg=$(shell_quote "$SOURCE")
            ;;
    esac
    steps+=(
        "$VENV_PY -m pip install -q $pkg $(shell_quote "jax[$JAX_EXTRA]")"
        'echo "[worker $worker] installed"'
    )
    join_statements "${steps[@]}"
}

train_script() {
    local env steps
    trainer_args "$(remote_config "$CONFIG")" "$WORKDIR" ${PASSTHROUGH[@]+"${PASSTHROUGH[@]}"}
    steps=(
        'set -u' "${PRELUDE[@]}" "$NOT_RUNNING"
        'cd "$HOME/rovit_jax" || { echo "[worker $worker] no ~/rovit_jax: install it first'\
' (without --no-install)" >&2; exit 1; }'
        'export PYTHONUNBUFFERED=1'
    )
    for env in ${ENVS[@]+"${ENVS[@]}"}; do
        steps+=("$(export_statement "$env")")
    done
    steps+=(
        'mkdir -p "$state_dir"'
        'log="$state_dir/train-$(date +%Y%m%d-%H%M%S).log"'
        'ln -sfn "$log" "$state_dir/train.log"'
        'rm -f "$state_dir/trainer.exit"'
        # The trainer ignores SIGHUP and writes to a file, so a dropped connection does not stop
        # it; the subshell records its exit code.
        "( trap '' HUP; $VENV_PY $(quote_cmd "${TRAINER_ARGS[@]}")"\
' < /dev/null >> "$log" 2>&1 & echo $! > "$state_dir/trainer.pid"; wait $!;'\
' echo $? > "$state_dir/trainer.exit" ) &'
        'runner=$!'
        'tail -n +1 -F --pid="$runner" "$log" 2>/dev/null | sed -u "s/^/[worker $worker] /"'
        'wait "$runner"'
        'rc=$(cat "$state_dir/trainer.exit" 2>/dev/null || echo 1)'
        'echo "[worker $worker] trainer exited with code $rc"'
        'exit "$rc"'
    )
    join_statements "${steps[@]}"
}

if ((STOP)); then
    on_workers "$(stop_script)"
    exit 0
fi

# --- the VM --------------------------------------------------------------------------------------
create_vm() {
    local cmd=("${GCLOUD[@]}" create "$NAME" "${WHERE[@]}")
    cmd+=("--accelerator-type=$ACCELERATOR" "--version=$VERSION")
    if [[ -n $CAPACITY ]]; then
        cmd+=("$CAPACITY")
    fi
    run "${cmd[@]}"
}

DESCRIBE=("${GCLOUD[@]}" describe "$NAME" "${WHERE[@]}" "--format=value(state)")
if ((DRY_RUN)); then
    trace "${DESCRIBE[@]}"
    if ((CREATE)); then
        note "dry run: the create command below runs only if the VM does not exist" \
            "(a preempted one is deleted first)"
        create_vm
    fi
else
    trace "${DESCRIBE[@]}"
    if ! STATE=$("${DESCRIBE[@]}"); then
        if ((!CREATE)); then
            die "TPU VM '$NAME' not found in zone $ZONE (see gcloud's message above);" \
                "pass --create --accelerator=TYPE to create it"
        fi
        create_vm
        STATE=READY
    fi
    waited=0
    while :; do
        case $STATE in
            READY) break ;;
            STOPPED) run "${GCLOUD[@]}" start "$NAME" "${WHERE[@]}" ;;
            PREEMPTED | TERMINATED)
                if ((!CREATE)); then
                    die "TPU VM '$NAME' is $STATE: delete it, or pass --create" \
                        "--accelerator=TYPE to recreate it"
                fi
                run "${GCLOUD[@]}" delete "$NAME" "${WHERE[@]}" --quiet
                create_vm
                ;;
            CREATING | STARTING | RESTARTING | REPAIRING | STOPPING)
                if ((waited >= 1800)); then
                    die "TPU VM '$NAME' is still $STATE after ${waited}s"
                fi
                note "TPU VM '$NAME' is $STATE; waiting"
                sleep 30
                waited=$((waited + 30))
                ;;
            *) die "TPU VM '$NAME' is in state '$STATE'; expected READY" ;;
        esac
        STATE=$("${DESCRIBE[@]}") || die "could not describe TPU VM '$NAME'"
    done
fi

# --- software ------------------------------------------------------------------------------------
if ((INSTALL)); then
    case $SOURCE_KIND in
        local)
            if ((DRY_RUN)); then
                TMP_DIR="${TMPDIR:-/tmp}/rovit_jax.XXXXXX"
                note "dry run: $TMP_DIR stands for a new temporary directory"
            else
                git -C "$REPO_ROOT" rev-parse --git-dir >/dev/null 2>&1 ||
                    die "$REPO_ROOT is not a git checkout:" \
                        "pass --source=<git URL or pip requirement>"
                if [[ -n $(git -C "$REPO_ROOT" status --porcelain --untracked-files=no) ]]; then
                    note "warning: uncommitted changes in $REPO_ROOT are not installed" \
                        "(git archive packs HEAD)"
                fi
                TMP_DIR=$(mktemp -d "${TMPDIR:-/tmp}/rovit_jax.XXXXXX")
                trap 'rm -rf "$TMP_DIR"' EXIT
            fi
            run git -C "$REPO_ROOT" archive --format=tar.gz --prefix=rovit_jax/ \
                "--output=$TMP_DIR/rovit_jax.tar.gz" HEAD
            run "${GCLOUD[@]}" scp "$TMP_DIR/rovit_jax.tar.gz" "$NAME:rovit_jax.tar.gz" \
                "${WHERE[@]}" "${ALL_WORKERS[@]}"
            on_workers "$(install_script)"
            ;;
        git)
            on_workers "$(install_script)"
            ;;
        pip)
            on_workers "$(install_script)"
            # A pip-installed package has no configs/: copy this checkout's.
            run "${GCLOUD[@]}" scp --recurse "$REPO_ROOT/configs" "$NAME:rovit_jax/" \
                "${WHERE[@]}" "${ALL_WORKERS[@]}"
            ;;
    esac
fi

# --- training ------------------------------------------------------------------------------------
TRAIN_CMD=("${GCLOUD[@]}" ssh "$NAME" "${WHERE[@]}" "${ALL_WORKERS[@]}")
TRAIN_CMD+=("--command=bash -c $(shell_quote "$(train_script)")")
STOP_HINT=("$0" --name "$NAME" "${WHERE[@]}" --stop)
if ((DRY_RUN)); then
    trace "${TRAIN_CMD[@]}"
    if ((DELETE_AFTER)); then
        run "${GCLOUD[@]}" delete "$NAME" "${WHERE[@]}" --quiet
    fi
    exit 0
fi

STOPPING=0
STREAM_PID=""
PENDING_SIGNAL=0
# shellcheck disable=SC2317,SC2329  # invoked by the trap below
on_signal() {
    SIGNALLED=1
    if [[ -z "$STREAM_PID" ]]; then
        PENDING_SIGNAL=1 # before the stream's pid is known: handled right after
        return
    fi
    if ((STOPPING)); then
        note "second interrupt: no longer streaming; the trainers were already told to stop" \
            "(check with: $(quote_cmd "${STOP_HINT[@]}"))"
        kill -TERM "$STREAM_PID" 2>/dev/null || true
        exit 130
    fi
    STOPPING=1
    note "stopping: SIGTERM to the trainer on every worker; waiting for the checkpoint" \
        "(Ctrl-C again to stop waiting)"
    on_workers "$(stop_script)" ||
        note "could not reach the workers; retry with: $(quote_cmd "${STOP_HINT[@]}")"
}

# The stream runs as its own job (set -m): Ctrl-C at the terminal reaches only this script, which
# stops the trainers cleanly and keeps streaming until they have checkpointed.
# The trap is set before the stream starts, so no signal can fall between the two.
trace "${TRAIN_CMD[@]}"
trap on_signal INT TERM HUP
set -m
"${TRAIN_CMD[@]}" &
STREAM_PID=$!
set +m
if ((PENDING_SIGNAL)); then
    on_signal
fi
wait_for_child "$STREAM_PID"
STATUS=$CHILD_STATUS
trap - INT TERM HUP

if ((STATUS == 255)); then
    # ssh's own failure code: the trainers may well be running still, so the VM stays.
    note "lost the ssh connection to a worker (gcloud returned 255): the trainers may still be"
    note "running; see ~/.rovit_jax/train.log on the workers, or stop them with:"
    note "  $(quote_cmd "${STOP_HINT[@]}")"
    exit "$STATUS"
fi
if ((DELETE_AFTER)); then
    run "${GCLOUD[@]}" delete "$NAME" "${WHERE[@]}" --quiet
fi
if ((STATUS != 0)); then
    note "the trainers exited with an error (exit codes per worker above; gcloud returned $STATUS)."
    note "code $PREEMPTED_EXIT_CODE means preempted after a committed checkpoint:" \
        "rerun the same command to resume"
fi
exit "$STATUS"
