"""Test setup: 8 forced host CPU devices, set before jax is imported anywhere."""

import atexit
import os
import shutil
import tempfile

# The tests compile far more than they run (tiny shapes, a few steps), and most of a compile on
# CPU is LLVM's code generation: at optimisation level 0 the compile-bound tests took about a
# quarter less time (measured), while results only change by rounding, which every tolerance
# here allows for. Subprocesses that set their own device count take the same option.
TEST_XLA_OPTIONS = "--xla_backend_optimization_level=0"


def xla_flags(devices: int) -> str:
    """XLA_FLAGS for a test process (or a subprocess it starts) with `devices` CPU devices."""
    return f"--xla_force_host_platform_device_count={devices} {TEST_XLA_OPTIONS}"


os.environ.setdefault("XLA_FLAGS", xla_flags(8))
os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
os.environ.setdefault("JAX_PLATFORMS", "cpu")

# One persistent compilation cache for the whole test run, shared by the pytest-xdist workers
# and every subprocess they start (they inherit the environment): the same tiny train and
# predict steps are compiled by many tests and CLI runs. Made by the first process that loads
# this file (xdist's controller, which starts the workers after), removed when it exits.
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _cache = tempfile.mkdtemp(prefix="rovit_jax_tests_xla_cache_")
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _cache
    atexit.register(shutil.rmtree, _cache, ignore_errors=True)

# Loading triton's native module (torch._dynamo imports it, and torchvision and timm import that)
# after TensorFlow 2.21 has run in the same process segfaults. Test files import the PyTorch
# oracles lazily, after the shapes world has run TensorFlow through tfds, so which worker crashes
# depends on the order files reach it. Loading triton first avoids it (0.5 s).
try:
    import triton  # noqa: F401
except ImportError:  # torch absent, or a build without triton
    pass


# ---- a tiny detection run shared by test_predictor and test_export -----------------------------

import pytest  # noqa: E402

from rovit_jax.config_files import load_config

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _detect_config():
    return load_config("shapes_detect:tiny")


def _save_run(workdir: str, config, params, step: int) -> None:
    """config.json and checkpoints/<step>/ as the training loop writes them."""
    from rovit_jax.train.checkpoint import Checkpointer

    os.makedirs(workdir, exist_ok=True)
    with open(os.path.join(workdir, "config.json"), "w") as f:
        f.write(config.to_json_best_effort(indent=2))
    ckpt = Checkpointer(workdir, async_save=False)
    ckpt.save(step, {"params": params}, {"step": step})
    ckpt.close()


def build_tiny_detector_run(root: str) -> str:
    """`<root>/det`: a tiny shapes detection workdir (configs/shapes_detect.py:tiny) with its
    pretraining run in `pretrain/`, as training leaves them (config.json, orbax checkpoints, the
    world and its tokenizer under `<root>/tfds`).

    The checkpoints hold the tasks' initial parameters (the detector's backbone is the
    pretraining run's image tower): training would only change the values, and compiling the
    train steps would take most of the test budget. Shared by test_predictor and test_export.
    """
    import jax
    import ml_collections

    from rovit_jax.data import sources
    from rovit_jax.tasks.detect import DetectTask
    from rovit_jax.tasks.pretrain import PretrainTask

    workdir = os.path.join(root, "det")
    if os.path.exists(os.path.join(workdir, "done")):  # built by the other test file
        return workdir
    config = _detect_config()
    config.data.data_dir = os.path.join(root, "tfds")
    pcfg = ml_collections.ConfigDict(config.pretrain.to_dict())
    pcfg.data.data_dir = config.data.data_dir
    sources.tokenizer_for(pcfg)  # builds the world and trains its tokenizer, as pretraining does
    pretrain = PretrainTask(pcfg)
    _save_run(
        os.path.join(workdir, "pretrain"),
        pcfg,
        jax.jit(pretrain.init_params)(jax.random.PRNGKey(1)),
        12,
    )
    task_config = ml_collections.ConfigDict(config.to_dict())
    task_config.init.run_pretraining = False
    task = DetectTask(task_config, workdir)
    _ = task.pretrained, task.model  # loaded eagerly, as DetectTask.validate does
    _save_run(workdir, config, jax.jit(task.init_params)(jax.random.PRNGKey(0)), 4)
    open(os.path.join(workdir, "done"), "w").close()
    return workdir


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    return build_tiny_detector_run(str(tmp_path_factory.getbasetemp() / "tiny_detector_run"))


# ---- balance the two xdist workers ---------------------------------------------------------------
# `--dist loadfile` hands whole files to the workers in collection order. Starting with the files
# that take longest (measured: seconds of test time each, on the project's 2-core machine) keeps
# one worker from picking up a three-minute file when the other is nearly done. A stale list
# only costs balance, never a test.
SLOWEST_FILES_FIRST = (
    "test_ablations.py",  # 185 s
    "test_preemption.py",  # 149
    "test_gcs.py",  # 150
    "test_detector.py",  # 149
    "test_multihost_training.py",  # 137
    "test_recipes.py",  # 116
    "test_pretrain.py",  # 99
    "test_layouts.py",  # 77
    "test_colabs.py",  # 67
    "test_reliability.py",  # 67
    "test_roi_align.py",  # 51
    "test_vocabularies.py",  # 41
    "test_models.py",  # 41
)


def pytest_configure(config):
    # xdist otherwise reorders the files by their number of tests, which would undo the order.
    if hasattr(config.option, "loadscopereorder"):
        config.option.loadscopereorder = False


def pytest_collection_modifyitems(session, config, items):
    rank = {name: i for i, name in enumerate(SLOWEST_FILES_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: files stay whole


# ---- a local Google Cloud Storage server -------------------------------------------------------


def copy_tree(src: str, dst: str) -> None:
    """Copies every file under folder `src` to `dst`, keeping relative paths; either side may be
    local or a bucket URL (through rovit_jax.paths, as the project reads and writes them)."""
    from rovit_jax import paths

    src = paths.absolute(src)
    for name in paths.find(src):
        paths.write_bytes(dst + name[len(src) :], paths.read_bytes(name))


@pytest.fixture(scope="session")
def gcs_bucket():
    """`gs://<bucket>` on a local GCS emulator (PyPI `gcp-storage-emulator`, in memory; started
    through tests/gcs_emulator.py, which adds the generation headers tensorstore reads).

    Clients find it the standard way, through the environment (inherited by subprocesses):
    `STORAGE_EMULATOR_HOST` for gcsfs (every file the project reads or writes in a bucket) and
    `TENSORSTORE_GCS_HTTP_URL` for tensorstore (orbax's arrays). gcsfs's lookup of a bucket's
    layout uses a control-plane API the emulator lacks, so it is switched off here.
    """
    import socket
    import subprocess
    import sys
    import time

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    bucket = "rovit-test"
    server = subprocess.Popen(
        [sys.executable, os.path.join(REPO, "tests", "gcs_emulator.py"), str(port), bucket],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.time() + 30
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            break
        except OSError:
            if time.time() > deadline or server.poll() is not None:
                server.kill()
                raise RuntimeError(f"the GCS emulator did not start on port {port}") from None
            time.sleep(0.1)
    url = f"http://127.0.0.1:{port}"
    env = {
        "STORAGE_EMULATOR_HOST": url,
        "TENSORSTORE_GCS_HTTP_URL": url,
        "GCSFS_EXPERIMENTAL_ZB_HNS_SUPPORT": "false",
    }
    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    try:
        yield f"gs://{bucket}"
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        server.terminate()
        server.wait(timeout=10)


def train_t5_layout_spm(folder) -> str:
    """A small SentencePiece model in T5's layout (pad 0, EOS 1, unk 2, no BOS), the layout of
    SigLIP's c4_en vocabulary, saved as `<folder>/spiece.model` (the name Hugging Face's T5
    tokenizer loads from a folder); returns its path."""
    import sentencepiece as spm

    corpus = [
        "A Photo of a CAT on a mat, with 3 dogs!",
        "Hello World",
        "résumé café naïve",
        "the quick brown fox jumps over the lazy dog",
    ] * 50
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(corpus),
        model_prefix=os.path.join(str(folder), "spiece"),
        vocab_size=80,
        model_type="unigram",
        pad_id=0,
        eos_id=1,
        unk_id=2,
        bos_id=-1,
        hard_vocab_limit=False,
        character_coverage=1.0,
        minloglevel=2,
    )
    return os.path.join(str(folder), "spiece.model")
