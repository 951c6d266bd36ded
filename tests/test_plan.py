"""Memory plan (`python -m rovit_jax.plan`): state bytes per device against a numpy re-derivation
of the FSDP rule, compiled memory against the state and batch it must hold, remat's saving,
the verdict, and planning without data files or a pretraining run.

The two command-line runs start first and run beside the in-process tests (each compiles the
step on 8 simulated devices in its own process, as a user would).
"""

import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from rovit_jax import plan
from rovit_jax.config_files import load_config
from rovit_jax.models.layers import TRANSFORMER_SIZES
from rovit_jax.tasks.detect import DetectTask
from rovit_jax.tasks.pretrain import PretrainTask
from rovit_jax.train import mesh as mesh_lib
from rovit_jax.train.trainer import Trainer

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
N = 8  # devices (tests/conftest.py)
# The pretraining recipe's CPU smoke model (mu/8 towers) at a batch and image size where
# activations dominate the step's memory, so rematerialisation has something to save.
CLI_CONFIG = "configs/vit_b16_224_pretrain.py:small,layout=fsdp,remat={remat}"
CLI_OVERRIDES = (
    "--config.batch_size=256",
    "--config.pp.image_size=64",
    "--config.tokenizer.max_len=32",
)


def _load(name: str, arg: str | None = None):
    return load_config(f"{name}:{arg}" if arg else name)


def _cli(remat: str, json_path: str, *extra: str) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "rovit_jax.plan", f"--devices={N}", f"--json={json_path}"]
    cmd += [f"--config={CLI_CONFIG.format(remat=remat)}", *CLI_OVERRIDES, *extra]
    return subprocess.Popen(
        cmd, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
    )


@pytest.fixture(scope="module", autouse=True)
def cli_runs(tmp_path_factory):
    """remat=none judged against the default 32 GiB; remat=full against a 0.0001 GiB budget."""
    tmp = tmp_path_factory.mktemp("plan")
    runs = {
        "none": (_cli("none", str(tmp / "none.json")), tmp / "none.json"),
        "full": (
            _cli("full", str(tmp / "full.json"), "--device_memory_gib=0.0001"),
            tmp / "full.json",
        ),
    }
    yield runs
    for proc, _ in runs.values():
        if proc.poll() is None:
            proc.kill()


def _finish(runs, name):
    proc, path = runs[name]
    out, _ = proc.communicate(timeout=300)
    assert proc.returncode == 0, out
    with open(path) as f:
        return out, json.load(f)


def expected_state_bytes(param_shapes, n: int, min_size: int, sharded: bool) -> tuple[int, int]:
    """(total, per-device) float32 bytes: under FSDP an array of >= min_size elements with a
    dimension divisible by n is split n ways; everything else is whole on every device."""
    total = per_device = 0
    for shape in param_shapes:
        size = int(np.prod(shape, dtype=np.int64))
        total += 4 * size
        split = sharded and size >= min_size and any(d % n == 0 for d in shape)
        per_device += 4 * size // n if split else 4 * size
    return total, per_device


def _param_shapes(task) -> list[tuple[int, ...]]:
    abstract = jax.eval_shape(task.init_params, jax.random.key(0))
    assert {leaf.dtype for leaf in jax.tree.leaves(abstract)} == {np.dtype(np.float32)}
    return [leaf.shape for leaf in jax.tree.leaves(abstract)]


KEY_BYTES = 8  # a threefry random key: two uint32


def _batch_bytes_per_device(task) -> int:
    return sum(
        int(np.prod(s.shape)) * np.dtype(s.dtype).itemsize // N
        for s in task.batch_shapes().values()
    )


@pytest.mark.parametrize("layout", ["data", "fsdp"])
def test_state_bytes_follow_the_layout(layout):
    config = _load("vit_b16_224_pretrain", f"small,layout={layout}")
    # The recipe's data (tfds, SentencePiece file) is not set up: a training task refuses it.
    with pytest.raises(ValueError, match="tokenizer.model_path"):
        PretrainTask(config)
    task = plan.planning_task(config)
    mesh = mesh_lib.make_mesh(config.mesh)
    task.validate(mesh)
    trainer = Trainer(config, task, mesh)
    state, shardings = trainer.abstract_state, trainer.state_shardings

    params, params_dev = plan.shard_bytes(state["params"], shardings["params"])
    total, per_device = expected_state_bytes(
        _param_shapes(task), N, int(config.fsdp_min_size), sharded=layout == "fsdp"
    )
    assert (params, params_dev) == (total, per_device)
    if layout == "data":
        assert params_dev == params
    else:
        # Mostly split 8 ways; the slack is the small leaves kept whole.
        assert params / N < params_dev < params / 2
    # AdamW: two moments mirroring the parameters (and sharded like them), plus int32 counters.
    opt, opt_dev = plan.shard_bytes(state["opt_state"], shardings["opt_state"])
    assert 0 < opt - 2 * params <= 16
    assert opt_dev - 2 * params_dev == opt - 2 * params


def test_cli_plan_remat_saves_temp_memory_and_the_verdict_follows_the_budget(cli_runs):
    out_none, none = _finish(cli_runs, "none")
    out_full, full = _finish(cli_runs, "full")
    config = _load("vit_b16_224_pretrain", "small,layout=fsdp")
    config.batch_size, config.pp.image_size, config.tokenizer.max_len = 256, 64, 32
    task = PretrainTask(config, check_files=False)
    _, per_device = expected_state_bytes(
        _param_shapes(task), N, int(config.fsdp_min_size), sharded=True
    )
    state_dev = 3 * per_device + 3 * 4 + 8  # params, 2 moments; 3 step counters, 2 Adam counts
    for p in (none, full):
        assert p["mesh"] == {"data": 1, "fsdp": N} and p["per_device_batch"] == 256 // N
        assert p["param_bytes_per_device"] == per_device
        for key in ("argument_bytes", "output_bytes", "alias_bytes", "temp_bytes"):
            assert p[key] > 0, key
        # The compiled step's inputs are the state's shards, one batch shard and the seed's
        # key (two uint32, replicated), and the donated state is what the new state is
        # written into.
        assert p["argument_bytes"] == state_dev + _batch_bytes_per_device(task) + KEY_BYTES
        assert p["alias_bytes"] == state_dev
        assert p["peak_bytes"] == (
            p["argument_bytes"] + p["output_bytes"] - p["alias_bytes"] + p["temp_bytes"]
        )
    assert full["temp_bytes"] < 0.9 * none["temp_bytes"]
    assert full["flops_per_device"] > none["flops_per_device"]  # the recomputed forward

    # 6 x batch x tokens x matmul weights per token, from the mu size table: q, k, v, out (4 D^2)
    # and the MLP (2 D M) per block, plus the 8x8x3 -> D patch embedding of the image tower.
    d, depth, m, _ = TRANSFORMER_SIZES["mu"]
    blocks = depth * (4 * d * d + 2 * d * m)
    image_tokens, text_tokens = (64 // 8) ** 2, int(config.tokenizer.max_len)
    expected = 6 * 256 * (image_tokens * (blocks + 8 * 8 * 3 * d) + text_tokens * blocks)
    assert none["model_flops"] == expected
    assert none["model_flops"] / N < none["flops_per_device"]

    assert none["fits"] and "verdict            fits in 32 GiB per device" in out_none
    assert not full["fits"] and "does NOT fit in 0.0001 GiB per device" in out_full
    assert none["versions"]["jax"] == jax.__version__


def test_detection_plan_needs_no_data_and_no_pretraining_run(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # no pretraining run and no LVIS files anywhere near
    config = _load("lvis_detect", "small,layout=fsdp")
    config.batch_size = config.eval.batch_size = N
    with pytest.raises(ValueError, match="data.train_annotations"):
        DetectTask(config)
    # LVIS v1 trains on its 405 frequent + 461 common categories (the 337 rare are novel).
    assert plan.default_num_classes(config) == 866
    task = plan.planning_task(config)
    vocab = task.base_vocabulary
    assert vocab["embeddings"].shape == (1024, int(config.pretrain.model.embed_dim))
    assert int(vocab["valid"].sum()) == 866

    p = plan.plan(config, device_memory_gib=32.0)
    assert p.task == "detect" and p.per_device_batch == 1 and p.mesh == {"data": 1, "fsdp": N}
    assert p.param_count == sum(p.param_count_by_group.values())
    assert p.param_count_by_group["backbone"] > 0 and p.param_count_by_group["heads"] > 0
    state_dev = p.param_bytes_per_device + p.opt_bytes_per_device + 3 * 4
    assert p.alias_bytes == state_dev
    # The step's arguments besides the state: the seed's key and the training classifier
    # (replicated), and the batch shard; jit drops batch entries the loss never reads
    # (image_info), hence "at most".
    constants = (
        KEY_BYTES + np.asarray(vocab["embeddings"]).nbytes + np.asarray(vocab["valid"]).nbytes
    )
    assert state_dev + constants < p.argument_bytes
    assert p.argument_bytes <= state_dev + constants + _batch_bytes_per_device(task)
    assert p.temp_bytes > 0 and p.flops_per_device > 0 and p.compile_seconds > 0
    assert p.fits() and not p.fits(p.peak_bytes / 2**30 / 2)
    assert not os.listdir(tmp_path)


def test_device_count_cannot_change_once_jax_runs():
    jax.devices()
    with pytest.raises(RuntimeError, match="already initialised with 8 cpu"):
        plan.use_host_devices(4)
    plan.use_host_devices(N)  # the count it already has: nothing to change
