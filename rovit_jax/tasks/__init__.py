"""Tasks plugged into the shared training loop, by the config's `task` field."""

from __future__ import annotations

TASKS = ("pretrain", "detect")


def get_task(config, workdir: str = ""):
    """Builds the task named by `config.task` (a typed mapping, not a string registry of classes)."""
    if config.task == "pretrain":
        from rovit_jax.tasks.pretrain import PretrainTask

        return PretrainTask(config)
    if config.task == "detect":
        from rovit_jax.tasks.detect import DetectTask

        return DetectTask(config, workdir)
    raise ValueError(f"config key `task`: unknown task {config.task!r}; choose one of {TASKS}")
