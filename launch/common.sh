# shellcheck shell=bash
# Helpers shared by the launch scripts (sourced, not run): errors and exit codes, shell quoting,
# the dry-run aware `run`, long-option parsing and value checks.
#
# Conventions: usage errors (unknown or missing flags, bad values) exit 2 with a message naming the
# flag; runtime failures exit 1. Every command is traced as `+ <command>`, quoted so that it can be
# pasted into a shell: on stdout under --dry-run (and not run), on stderr otherwise.
#
# Written for bash >= 3.2 (the bash of macOS, where tpu_pod.sh is often started): no associative
# arrays, and empty arrays are expanded as ${a[@]+"${a[@]}"} because `set -u` rejects "${a[@]}".

# Globals below are read by the sourcing scripts.
# shellcheck disable=SC2034
{
    PROG=${0##*/}
    LAUNCH_DIR=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
    REPO_ROOT=${LAUNCH_DIR%/*}
    DRY_RUN=0
}

# Exit code of `python -m rovit_jax.main` after a preemption request was honoured and a checkpoint
# committed (rovit_jax.train.preemption.PREEMPTED_EXIT_CODE): rerunning resumes from it.
# shellcheck disable=SC2034
PREEMPTED_EXIT_CODE=75

usage_error() {
    printf '%s: error: %s\n' "$PROG" "$*" >&2
    printf "Run '%s --help' for usage.\n" "$PROG" >&2
    exit 2
}

die() {
    printf '%s: error: %s\n' "$PROG" "$*" >&2
    exit 1
}

# note MESSAGE: to stderr; never fails (stderr may be a terminal that has gone away).
note() {
    printf '%s: %s\n' "$PROG" "$*" >&2 || true
}

# shell_quote WORD: WORD quoted for any POSIX shell (and for Python's shlex.split). Plain words
# stay bare; anything else is single-quoted with embedded quotes written as '\''. Unlike
# `printf %q`, the result never uses bash-only $'...' syntax, so it survives a remote login shell
# that is not bash.
shell_quote() {
    local s=$1
    if [[ -n $s && $s != *[!A-Za-z0-9_./:=@%+,-]* ]]; then
        printf '%s' "$s"
    else
        s=${s//\'/\'\\\'\'}
        printf "'%s'" "$s"
    fi
}

# quote_cmd ARGS...: the command line, each argument quoted, separated by single spaces.
quote_cmd() {
    local out="" arg
    for arg in "$@"; do
        out+="${out:+ }$(shell_quote "$arg")"
    done
    printf '%s' "$out"
}

# trace ARGS...: prints `+ <quoted command>` (stdout under --dry-run, stderr otherwise).
trace() {
    if ((DRY_RUN)); then
        printf '+ %s\n' "$(quote_cmd "$@")"
    else
        printf '+ %s\n' "$(quote_cmd "$@")" >&2 || true
    fi
}

# run ARGS...: traces the command, then runs it unless this is a dry run.
run() {
    trace "$@"
    if ((DRY_RUN)); then
        return 0
    fi
    "$@"
}

# join_statements STATEMENT...: one line of shell code. Statements are separated by "; ", or by a
# space after one that ends in a lone "&" (where ";" would be a syntax error).
join_statements() {
    local out="" stmt sep=""
    for stmt in "$@"; do
        out+="$sep$stmt"
        if [[ $stmt == *[!\&]\& ]]; then sep=" "; else sep="; "; fi
    done
    printf '%s' "$out"
}

# --- option parsing ------------------------------------------------------------------------------
# Every flag is a long option given as `--flag value` or `--flag=value`. A script loops:
#
#   while (($#)); do
#       parse_flag "$@"
#       case $FLAG in
#           --config) flag_value; CONFIG=$VALUE ;;
#           --dry-run) flag_switch; DRY_RUN=1 ;;
#           --) shift; PASSTHROUGH=("$@"); break ;;
#           *) unknown_flag ;;
#       esac
#       shift "$SHIFT_BY"
#   done
#
# FLAG, VALUE and SHIFT_BY are read by the sourcing script.
# shellcheck disable=SC2034
parse_flag() {
    FLAG=$1
    VALUE=""
    SHIFT_BY=1
    _INLINE=0
    _HAS_NEXT=0
    _NEXT=""
    if (($# > 1)); then
        _HAS_NEXT=1
        _NEXT=$2
    fi
    if [[ $FLAG == --?*=* ]]; then
        VALUE=${FLAG#*=}
        FLAG=${FLAG%%=*}
        _INLINE=1
    fi
}

# flag_value: the current flag takes a value, inline or as the next argument. A next argument that
# starts with "--" is taken for a forgotten value (pass such a value as --flag=--value).
# shellcheck disable=SC2034
flag_value() {
    if ((_INLINE)); then
        if [[ -z $VALUE ]]; then
            usage_error "$FLAG needs a non-empty value"
        fi
        return 0
    fi
    if ((!_HAS_NEXT)) || [[ -z $_NEXT || $_NEXT == --* ]]; then
        usage_error "$FLAG needs a value"
    fi
    VALUE=$_NEXT
    SHIFT_BY=2
}

# flag_switch: the current flag takes no value.
flag_switch() {
    if ((_INLINE)); then
        usage_error "$FLAG takes no value (got '$FLAG=$VALUE')"
    fi
}

unknown_flag() {
    if [[ $FLAG == -* ]]; then
        usage_error "unknown flag: $FLAG"
    fi
    usage_error "unexpected argument: '$FLAG' (arguments for the trainer go after --)"
}

# require_flag VALUE FLAG: exits 2 naming FLAG when VALUE is empty.
require_flag() {
    if [[ -z $1 ]]; then
        usage_error "missing required flag $2"
    fi
}

# check_positive_int VALUE FLAG
check_positive_int() {
    if [[ ! $1 =~ ^[1-9][0-9]*$ ]]; then
        usage_error "$2 must be a positive integer, got '$1'"
    fi
}

# check_env_assignment KEY=VALUE FLAG: KEY must be a shell variable name.
check_env_assignment() {
    local key=${1%%=*}
    if [[ $1 != *=* || ! $key =~ ^[A-Za-z_][A-Za-z0-9_]*$ ]]; then
        usage_error "$2 expects KEY=VALUE with KEY a variable name, got '$1'"
    fi
}

# export_statement KEY=VALUE: `export KEY=<quoted VALUE>` for a generated script.
export_statement() {
    printf 'export %s=%s' "${1%%=*}" "$(shell_quote "${1#*=}")"
}

# trainer_args CONFIG WORKDIR [ARGS...]: the arguments after `python`, one per line of TRAINER_ARGS.
# shellcheck disable=SC2034
trainer_args() {
    TRAINER_ARGS=(-m rovit_jax.main "--config=$1" "--workdir=$2")
    shift 2
    if (($#)); then
        TRAINER_ARGS+=("$@")
    fi
}

# wait_for_child PID: waits for a background child, also through trapped signals, and sets
# CHILD_STATUS to its exit status. A trap interrupts `wait` (which then returns 128+signal): trap
# handlers set SIGNALLED=1 so that such a return is told from the child's own status.
# shellcheck disable=SC2034
wait_for_child() {
    local pid=$1 status
    while :; do
        SIGNALLED=0
        status=0
        wait "$pid" || status=$?
        if ((!SIGNALLED)); then
            break
        fi
        if ! kill -0 "$pid" 2>/dev/null; then
            # Interrupted just as the child ended; its status is still waiting to be collected.
            status=0
            wait "$pid" || status=$?
            break
        fi
    done
    CHILD_STATUS=$status
}
