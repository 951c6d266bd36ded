"""Sharded train state and train step, built once from (config, task, mesh).

The state is created directly sharded: `jax.eval_shape(init)` gives its structure, regex rules give
its shardings, and `jax.jit(init, out_shardings=...)` materialises each shard where it lives.
"""

from __future__ import annotations

from typing import Any, Protocol

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
from jax.sharding import Mesh

from rovit_jax.data.stream import Batches
from rovit_jax.models import layers
from rovit_jax.models.logical_axes import param_logical_axes
from rovit_jax.run_config import run_settings
from rovit_jax.train import guards
from rovit_jax.train import mesh as mesh_lib
from rovit_jax.train.optim import make_optimizer, optim_settings, regex_mask

# {"params", "opt_state", "step", "skipped_updates", "consecutive_nonfinite"} (see train.guards).
State = dict[str, Any]


class Task(Protocol):
    """What a task (pretraining, detection, ...) plugs into the shared loop."""

    config: ml_collections.ConfigDict

    def validate(self, mesh: Mesh) -> None:
        """Raises ValueError naming the config key for any bad setting, before compiling."""

    def init_params(self, rng: jax.Array) -> Any:
        """Fresh parameters (a pure function, traced under eval_shape and jit)."""

    def init_model_params(self, rng: jax.Array) -> Any:
        """The model's own initialisation, before `init_params` loads any pretrained values:
        only traced, for the logical axis names its modules give (models.logical_axes)."""

    def loss_fn(
        self, params: Any, batch: dict[str, jax.Array], rng: jax.Array
    ) -> tuple[jax.Array, dict[str, jax.Array]]:
        """Scalar loss and a dict of scalar metrics for one global batch.

        A task with `step_constants()` (optional) also takes `constants=`: that pytree, passed
        to the jitted step as an argument."""

    def batch_shapes(self) -> dict[str, jax.ShapeDtypeStruct]:
        """Global shapes of one training batch (for ahead-of-time compilation)."""

    def train_batches(self, process_index: int, process_count: int) -> Batches:
        """This host's training input (`data.stream.Batches`: `batch(step)` and tallies)."""

    def evaluate(self, trainer: Trainer, params: Any) -> dict[str, float]:
        """Evaluation metrics of `params` (every host calls it; all return the same values)."""


class Trainer:
    """Holds the jitted init and train step of a task on a mesh."""

    def __init__(self, config: ml_collections.ConfigDict, task: Task, mesh: Mesh):
        self.config, self.task, self.mesh = config, task, mesh
        optim, run = optim_settings(config), run_settings(config)
        self.tx, self.schedule = make_optimizer(optim, run.total_steps)
        init_rng, self.step_rng = jax.random.split(jax.random.key(run.seed))
        self._init_rng = init_rng

        self.abstract_state = jax.eval_shape(self._init_state, init_rng)
        # Frozen parameters enter the loss behind stop_gradient, so their backward pass (e.g. a
        # frozen detection backbone's) is never computed, not merely discarded by the optimizer.
        frozen = optim.frozen
        self.frozen_mask = regex_mask(self.abstract_state["params"], frozen) if frozen else None
        # The modules' logical axis names of every parameter (traced, not computed): a second
        # trace of the model's init, so only where a table will read them.
        logical_rules = list(run.logical_axis_rules)
        logical_axes = {}
        if logical_rules:
            logical_axes = {
                mesh_lib.path_str(path): names
                for path, names in param_logical_axes(self.task.init_model_params, init_rng).items()
            }
        self.state_shardings = mesh_lib.infer_shardings(
            self.abstract_state,
            mesh,
            list(run.sharding_rules),
            fsdp_min_size=run.fsdp_min_size,
            logical_axes=logical_axes,
            logical_rules=logical_rules,
        )
        self.batch_sharding = mesh_lib.batch_sharding(mesh)
        self.replicated = mesh_lib.replicated(mesh)
        self._jit_init = jax.jit(self._init_state, out_shardings=self.state_shardings)
        # Values the step reads but never changes (the seed's key, a task's step_constants(),
        # e.g. the detector's text classifier) enter as an argument, not as constants baked
        # into the program: runs that differ only in them (seeds, backbones) compile the same
        # program and share it through the persistent compilation cache. Built at the first
        # step, so that an evaluation-only run never needs a training vocabulary.
        self._task_has_constants = getattr(task, "step_constants", None) is not None
        self._step_constants: dict[str, Any] | None = None
        self._jit_step = jax.jit(
            self._train_step,
            in_shardings=(self.state_shardings, self.batch_sharding, self.replicated),
            out_shardings=(self.state_shardings, self.replicated),
            # The old state's buffers are reused for the new one (halves state memory).
            donate_argnums=(0,) if run.donate_state else (),
        )

    def _init_state(self, rng: jax.Array) -> State:
        params = self.task.init_params(rng)
        return {
            "params": params,
            "opt_state": self.tx.init(params),
            "step": jnp.zeros((), jnp.int32),
            **guards.init_counters(),
        }

    def init_state(self) -> State:
        return self._jit_init(self._init_rng)

    def train_step(
        self, state: State, batch: dict[str, jax.Array]
    ) -> tuple[State, dict[str, jax.Array]]:
        """One jitted optimizer step on a global batch: (new state, scalar metrics)."""
        return self._jit_step(state, batch, self.step_constants)

    @property
    def step_constants(self) -> dict[str, Any]:
        """{"step_rng": the seed's step key, "task": the task's step_constants() or {}}."""
        if self._step_constants is None:
            task_constants = self.task.step_constants() if self._task_has_constants else {}
            # Uncommitted arrays (as the evaluation's text inputs): jit replicates them, on one
            # host or many.
            self._step_constants = {
                "step_rng": self.step_rng,
                "task": jax.tree.map(jnp.asarray, task_constants),
            }
        return self._step_constants

    def _train_step(
        self, state: State, batch: dict[str, jax.Array], constants: dict[str, Any]
    ) -> tuple[State, dict[str, jax.Array]]:
        # The step's RNG depends only on (seed, step): a resumed run draws the same numbers.
        rng = jax.random.fold_in(constants["step_rng"], state["step"])
        grad_fn = jax.value_and_grad(self._loss_with_frozen, has_aux=True)
        with layers.batch_sharding(self.batch_sharding):  # for scanned blocks (see layers)
            (loss, metrics), grads = grad_fn(state["params"], batch, rng, constants["task"])
        updates, opt_state = self.tx.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
        grad_norm = optax.tree.norm(grads)
        # A non-finite step keeps the old params/opt_state but still advances "step" (guards).
        guarded, guard_metrics = guards.guarded_update(
            state, params, opt_state, loss, grad_norm, optax.tree.norm(params)
        )
        metrics = dict(
            metrics,
            loss=loss,
            learning_rate=self.schedule(state["step"]),
            grad_norm=grad_norm,
            param_norm=optax.tree.norm(guarded["params"]),
            **guard_metrics,
        )
        return dict(guarded, step=state["step"] + 1), metrics

    def _loss_with_frozen(self, params, batch, rng, task_constants):
        if self.frozen_mask is not None:
            params = jax.tree.map(
                lambda p, f: jax.lax.stop_gradient(p) if f else p, params, self.frozen_mask
            )
        if self._task_has_constants:
            return self.task.loss_fn(params, batch, rng, constants=task_constants)
        return self.task.loss_fn(params, batch, rng)

    def global_batch(self, local_batch: dict[str, np.ndarray]) -> dict[str, jax.Array]:
        """Assembles each host's slice of the batch into global arrays sharded over the batch axes."""
        n = jax.process_count()
        return {
            k: jax.make_array_from_process_local_data(
                self.batch_sharding, v, (v.shape[0] * n,) + v.shape[1:]
            )
            for k, v in local_batch.items()
        }

    def abstract_batch(self) -> dict[str, jax.ShapeDtypeStruct]:
        return {
            k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=self.batch_sharding)
            for k, v in self.task.batch_shapes().items()
        }

    def param_shardings(self) -> Any:
        return self.state_shardings["params"]

    def lower(self):
        """Lowers the train step for the abstract state and batch (AOT compile, cost analysis)."""
        abstract = jax.tree.map(
            lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
            self.abstract_state,
            self.state_shardings,
        )
        return self._jit_step.lower(abstract, self.abstract_batch(), self.step_constants)

    def compile_step(self) -> CompiledStep:
        """The ahead-of-time compiled train step, called as (state, batch) like `train_step`."""
        # An AOT executable takes its inputs where it was compiled to expect them.
        constants = jax.device_put(self.step_constants, self.replicated)
        return CompiledStep(self.lower().compile(), constants)


class CompiledStep:
    """An AOT-compiled train step called as (state, batch), with the step's constants bound;
    XLA's analyses of the executable (cost, memory, text) pass through."""

    def __init__(self, compiled: Any, constants: dict[str, Any]):
        self.compiled, self.constants = compiled, constants

    def __call__(self, state: State, batch: dict[str, jax.Array]) -> tuple[State, Any]:
        return self.compiled(state, batch, self.constants)

    def cost_analysis(self) -> Any:
        return self.compiled.cost_analysis()

    def memory_analysis(self) -> Any:
        return self.compiled.memory_analysis()

    def as_text(self) -> str:
        return self.compiled.as_text()
