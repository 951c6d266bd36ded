"""Tasks plugged into the shared training loop, by the config's `task` field."""

from __future__ import annotations


def get_task(config):
    """Builds the task named by `config.task` (a typed mapping, not a string registry of classes)."""
    if config.task == "pretrain":
        from rovit_jax.tasks.pretrain import PretrainTask

        return PretrainTask(config)
    raise ValueError(
        f"config key `task`: unknown task {config.task!r}; choose one of ('pretrain',)"
    )
