"""The training loop: one jitted step over stacked micro-batches, eval, checkpoints, logs.

The step takes ``[accum, micro_batch, ...]`` arrays. It sums the objective's ``count`` over all of
them (and, through the global arrays, over all devices) to get ``num_items``, then scans over the
micro-batches accumulating float32 gradients of ``objective.loss(model, mb, num_items)``. The result
is exactly the gradient of the one-big-batch loss. Only the trainable part of the model (all
parameters, or the LoRA adapters) is differentiated and has optimizer state, which is float32 whatever
the parameters' dtype; bfloat16 parameters take the update by stochastic rounding (``jaxpref.precision``).

A non-finite loss or gradient norm leaves parameters and optimizer state unchanged inside the step;
the loop then stops with an error naming the step, or skips it with ``skip_nonfinite_steps``.
"""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Iterable, Iterator, Mapping
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from jaxpref import bit_patterns, platform, precision
from jaxpref import sharding as shd
from jaxpref.errors import UserError
from jaxpref.models import nf4
from jaxpref.objectives.base import Objective

logger = logging.getLogger(__name__)

NumpyBatch = Mapping[str, np.ndarray]


class NonFiniteError(UserError):
    """The loss or gradient became NaN/inf."""


@dataclasses.dataclass
class LoopSettings:
    total_steps: int
    grad_accum: int = 1
    logging_steps: int = 1
    eval_every: int | None = None
    save_every: int | None = None
    skip_nonfinite: bool = False


def _zeros_f32(tree: Any) -> Any:
    return jax.tree.map(lambda x: jnp.zeros(x.shape, jnp.float32), tree)


def _key_sum(batch: Mapping[str, jax.Array], prefixes: tuple[str, ...], key: str, pred: Callable) -> jax.Array:
    """Sum of ``pred(x)`` over ``batch[prefix + key]`` for the objective's trained sequences (0 for a key
    the objective's batches do not have)."""
    arrays = [batch[p + key] for p in prefixes if p + key in batch]
    return sum((jnp.sum(pred(x).astype(jnp.float32)) for x in arrays), jnp.zeros((), jnp.float32))


def _reseed(model: nnx.Module, key: jax.Array) -> None:
    """Fresh dropout keys per step (derived from the step number, so resume is exact)."""
    if jax.tree.leaves(nnx.state(model, nnx.RngKey)):
        nnx.reseed(model, dropout=key)


class Trainer:
    """Holds the split model (graph, trainable, frozen), optimizer state and the jitted functions."""

    def __init__(
        self,
        model: nnx.Module,
        objective: Objective,
        tx: optax.GradientTransformation,
        *,
        mesh: Mesh,
        trainable: Any = nnx.Param,
        rules: Any = None,
        seed: int = 0,
        companions: Mapping[str, nnx.Module] | None = None,
        rounding: str = "stochastic",
        step_inputs: Mapping[str, Callable[[jax.Array], jax.Array]] | None = None,
    ):
        """``companions``: frozen models the objective reads (``objective.companions`` names them:
        an online KD teacher, a DPO reference copy). They are sharded by the same rules, passed to
        the jitted step as arguments (never baked in as constants) and never differentiated.

        ``rounding``: how updates reach bfloat16 parameters, "stochastic" (jaxpref's policy) or
        "nearest" (what PyTorch's in-place bfloat16 update does; for comparisons, see
        ``jaxpref.precision``).

        ``step_inputs``: {batch key: f(step number) -> scalar} added to every micro-batch inside the step
        (``Objective.schedules``: the KD temperature schedule) and logged with the step's metrics."""
        if rounding not in ("stochastic", "nearest"):
            raise ValueError(f"rounding={rounding!r}: use 'stochastic' or 'nearest'")
        self.objective = objective
        self.step_inputs = dict(step_inputs or {})
        missing = [n for n in objective.companions if n not in (companions or {})]
        if missing:
            raise ValueError(f"objective {objective.name!r} needs companion model(s) {missing}")
        self.tx = tx
        self.mesh = mesh
        self.rules = rules
        graphdef, params, frozen = nnx.split(model, trainable, ...)
        self.graphdef = graphdef
        # A model from nnx.eval_shape gives a Trainer whose state is shapes only: lowered, never run.
        self.abstract = all(isinstance(x, jax.ShapeDtypeStruct) for x in jax.tree.leaves(params))
        self.params_sharding = shd.state_shardings(params, mesh, rules)
        self.frozen_sharding = shd.state_shardings(frozen, mesh, rules)
        self.params = shd.place(params, self.params_sharding)
        # On CPU frozen 16-bit weights are held as uint16 views of the same memory (jaxpref.bit_patterns);
        # ``frozen_dtypes`` are their real dtypes, ``frozen_view()`` the weights as such.
        self.frozen_dtypes = bit_patterns.storage_dtypes(frozen)
        self.frozen = shd.place(frozen, self.frozen_sharding)
        if platform.kernel_platform() == "cpu":
            self.frozen = bit_patterns.to_bits(self.frozen)
        self.companion_graphdefs, companion_states = {}, {}
        for name in objective.companions:
            self.companion_graphdefs[name], companion_states[name] = nnx.split(companions[name])
        self.companions_sharding = shd.state_shardings(companion_states, mesh, rules)
        self.companions = shd.place(companion_states, self.companions_sharding)
        init_opt = lambda p: precision.init_optimizer_state(tx, p)
        opt_shapes = jax.eval_shape(init_opt, self.params)
        self.opt_sharding = shd.state_shardings(opt_shapes, mesh, rules, like=self.params)
        if self.abstract:
            self.opt_state = shd.place(opt_shapes, self.opt_sharding)
        else:
            self.opt_state = jax.jit(init_opt, out_shardings=self.opt_sharding)(self.params)
        self.step = 0
        self._seed, self._stochastic_rounding = seed, rounding == "stochastic"
        self._replicated = NamedSharding(mesh, PartitionSpec())
        self._train_step = self._jit_train_step(self._train_step_impl)
        self._eval_step = jax.jit(
            self._eval_step_impl,
            in_shardings=(self.params_sharding, self.frozen_sharding, self.companions_sharding, None),
            out_shardings=self._replicated,
        )

    def _jit_train_step(self, impl: Callable) -> Callable:
        return jax.jit(
            impl,
            in_shardings=(
                self.params_sharding, self.frozen_sharding, self.companions_sharding, self.opt_sharding, None,
                self._replicated,
            ),
            out_shardings=(self.params_sharding, self.opt_sharding, self._replicated),
            donate_argnums=(0, 3),
        )  # fmt: skip

    def export_train_step(self, batch: Mapping[str, jax.ShapeDtypeStruct], target: str) -> jax.export.Exported:
        """The jitted train step lowered with ``jax.export`` for ``target`` ("tpu" or "cuda"), kernels
        chosen as on that platform (``jaxpref.platform.lowering_for``).

        ``batch``: [accum, micro_batch, ...] shapes and dtypes of the stacked micro-batches (global).
        """
        batch, step = self._step_shapes(batch)
        # Kernels are chosen while tracing and JAX caches traces (remat, scan) by function: start clean,
        # and leave clean, so no trace made for one platform is reused for another.
        jax.clear_caches()
        try:
            with platform.lowering_for(target), platform.kernel_mesh(self.mesh):
                # a fresh function object: the jit trace cache must not return another platform's trace
                step_fn = self._jit_train_step(lambda *a: self._train_step_impl(*a))
                return jax.export.export(
                    step_fn, platforms=[target], disabled_checks=platform.export_safety_exemptions(target)
                )(self.params, self.frozen_view(), self.companions, self.opt_state, batch, step)
        finally:
            jax.clear_caches()

    def _step_shapes(self, batch: Mapping[str, jax.ShapeDtypeStruct]) -> tuple[dict[str, Any], Any]:
        """The batch and step-number arguments of the train step as sharded shapes."""
        sharding = shd.batch_sharding(self.mesh, leading_dims=1)
        batch = {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=sharding) for k, v in batch.items()}
        return batch, jax.ShapeDtypeStruct((), jnp.int32, sharding=self._replicated)

    def compile_train_step(self, batch: Mapping[str, jax.ShapeDtypeStruct]) -> jax.stages.Compiled:
        """The jitted train step compiled for this machine from shapes only (for its memory analysis).

        ``batch``: as in ``export_train_step``."""
        batch, step = self._step_shapes(batch)
        with platform.kernel_mesh(self.mesh):
            lowered = self._train_step.lower(self.params, self.frozen, self.companions, self.opt_state, batch, step)
        return lowered.compile()

    # ---- model views -------------------------------------------------------------------------
    def model(self) -> nnx.Module:
        """The current model (trainable + frozen state merged); for export and tests."""
        return nnx.merge(self.graphdef, self.params, self.frozen_view())

    def frozen_view(self) -> Any:
        """The frozen state in its own dtypes (``self.frozen`` may hold uint16 views on CPU); no copy."""
        return bit_patterns.view_as(self.frozen, self.frozen_dtypes)

    def num_params(self) -> tuple[int, int]:
        """(trainable, frozen) parameter counts; RNG state (LoRA dropout keys) is not a parameter. An NF4
        (QLoRA) weight counts its values: two per byte of codes (its scales are not parameters)."""

        return nf4.parameter_count(self.params), nf4.parameter_count(self.frozen)

    # ---- jitted functions --------------------------------------------------------------------
    def _micro_loss(self, params, frozen, companions, mb, num_items, key, *, train: bool):
        # copy=True: the merged model must own its variables, since reseeding mutates RNG state
        # that otherwise belongs to an outer trace.
        model = nnx.merge(self.graphdef, params, bit_patterns.from_bits(frozen, self.frozen_dtypes), copy=True)
        if train:
            _reseed(model, key)
        if not self.objective.companions:
            return self.objective.loss(model, mb, num_items, train=train)
        others = {
            name: nnx.merge(gd, jax.lax.stop_gradient(companions[name]), copy=True)
            for name, gd in self.companion_graphdefs.items()
        }
        return self.objective.loss(model, mb, num_items, train=train, companions=others)

    def _train_step_impl(self, params, frozen, companions, opt_state, batch, step):
        accum = jax.tree.leaves(batch)[0].shape[0]
        counts = jax.vmap(self.objective.count)(batch)
        num_items = jnp.maximum(jnp.sum(counts), 1.0)
        # the key is made inside the step, not closed over: a captured array would be a hoisted constant
        # argument, which jax.export of the step cannot carry
        step_key = jax.random.fold_in(jax.random.key(self._seed), step)
        grad_fn = jax.value_and_grad(self._micro_loss, has_aux=True)
        scheduled = self._scheduled(step)

        def micro(mb, i, float32_grads=True):
            """(grads, loss, metrics) of one micro-batch; float32, but for the gradients of a single
            micro-batch, which keep their parameters' dtype."""
            (loss, metrics), grads = grad_fn(
                params, frozen, companions, {**mb, **scheduled}, num_items, jax.random.fold_in(step_key, i), train=True
            )
            if float32_grads:
                grads = jax.tree.map(lambda x: x.astype(jnp.float32), grads)
            return grads, *jax.tree.map(lambda x: x.astype(jnp.float32), (loss, metrics))

        def one(carry, xs):
            return jax.tree.map(jnp.add, carry, micro(*xs)), None

        if accum == 1:
            # No accumulator: a zero-filled float32 copy of the gradients (one more parameter-sized
            # buffer and two passes over it) for a single micro-batch would be pure overhead, and so
            # would a float32 copy of bfloat16 gradients (the optimizer upcasts as it reads them).
            grads, loss, metrics = micro(jax.tree.map(lambda x: x[0], batch), 0, float32_grads=False)
        else:
            init = _zeros_f32(jax.eval_shape(micro, jax.tree.map(lambda x: x[0], batch), 0))
            (grads, loss, metrics), _ = jax.lax.scan(one, init, (batch, jnp.arange(accum)))

        grad_norm = optax.global_norm(jax.tree.map(lambda g: g.astype(jnp.float32), grads))
        finite = jnp.isfinite(loss) & jnp.isfinite(grad_norm)

        def update(state):
            p, o = state
            updates, new_o = self.tx.update(grads, o, p)
            seed = precision.rounding_seed(self._seed, step) if self._stochastic_rounding else None
            new_p = precision.apply_updates(p, updates, seed)
            return new_p, precision.keep_dtypes(new_o, o)

        # A cond, not a select over every parameter: the update streams p, m, v once instead of
        # reading the old and the new values of each for a where.
        new_params, new_opt_state = jax.lax.cond(finite, update, lambda state: state, (params, opt_state))
        stats = {
            "loss": loss,
            "grad_norm": grad_norm,
            "num_items": jnp.sum(counts),
            "tokens": _key_sum(batch, self.objective.sequences, "segment_ids", lambda x: x > 0),
            "trainable_tokens": _key_sum(batch, self.objective.sequences, "loss_mask", lambda x: x),
            "finite": finite,
            **metrics,
            **scheduled,
        }
        return new_params, new_opt_state, stats

    def _scheduled(self, step: Any) -> dict[str, jax.Array]:
        """The step inputs at ``step`` (traced or not), float32 scalars."""
        return {name: jnp.asarray(fn(step), jnp.float32) for name, fn in self.step_inputs.items()}

    def _eval_step_impl(self, params, frozen, companions, batch):
        loss, metrics = self._micro_loss(params, frozen, companions, batch, jnp.float32(1.0), None, train=False)
        return {"loss": loss, **metrics, "num_items": self.objective.count(batch)}

    # ---- host-side API -----------------------------------------------------------------------
    def train_step(self, micro_batches: list[NumpyBatch]) -> dict[str, float]:
        """Run one optimizer step on ``accum`` micro-batches (numpy, per process)."""
        stacked = stack_micro_batches(micro_batches)
        batch = shd.global_batch(stacked, self.mesh, leading_dims=1)
        with platform.kernel_mesh(self.mesh):
            self.params, self.opt_state, stats = self._train_step(
                self.params, self.frozen, self.companions, self.opt_state, batch, jnp.int32(self.step)
            )
        self.step += 1
        return {k: float(v) for k, v in jax.device_get(stats).items()}

    def evaluate(self, batches: Iterable[NumpyBatch]) -> dict[str, float]:
        """Count-weighted means of the objective's loss and metrics over ``batches``."""
        totals = None
        scheduled = self._scheduled(jnp.int32(self.step))
        for mb in batches:
            with platform.kernel_mesh(self.mesh):
                batch = {**shd.global_batch(mb, self.mesh), **scheduled}
                out = self._eval_step(self.params, self.frozen, self.companions, batch)
            totals = out if totals is None else jax.tree.map(jnp.add, totals, out)
        if totals is None:
            return {}
        sums = {k: float(v) for k, v in jax.device_get(totals).items()}  # one host sync per evaluation
        n = sums.pop("num_items")
        return {k: v / n for k, v in sums.items()} if n else {}

    def restore_state(self, params: Any, opt_state: Any, step: int) -> None:
        self.params = jax.device_put(params, self.params_sharding)
        self.opt_state = jax.device_put(opt_state, self.opt_sharding)
        self.step = step


def stack_micro_batches(micro_batches: list[NumpyBatch]) -> dict[str, np.ndarray]:
    """Stack micro-batches to [accum, B, T, ...], padding the time axis to their longest T.

    Padding entries are zeros: segment 0, masks False, so they contribute nothing. (The pipeline
    already gives every process the same T for a given micro-batch.)
    """
    # T of every [B, T, ...] key (LM batches: input_ids; pair batches: chosen_/rejected_ keys).
    time_len = max(np.ndim(a) >= 2 and np.shape(a)[1] or 0 for mb in micro_batches for a in mb.values())
    out = {}
    for key in micro_batches[0]:
        arrays = []
        for mb in micro_batches:
            a = np.asarray(mb[key])
            if a.ndim >= 2 and a.shape[1] != time_len:
                pad = [(0, 0)] * a.ndim
                pad[1] = (0, time_len - a.shape[1])
                a = np.pad(a, pad)
            arrays.append(a)
        out[key] = np.stack(arrays)
    return out


def take_micro_batches(it: Iterator[NumpyBatch], n: int) -> list[NumpyBatch] | None:
    """The next ``n`` micro-batches, or None when the iterator cannot fill a whole step."""
    out = []
    for _ in range(n):
        try:
            out.append(next(it))
        except StopIteration:
            return None
    return out


@dataclasses.dataclass
class LoopHooks:
    """Callbacks the loop needs from the outside world (all optional)."""

    eval_batches: Callable[[], Iterable[NumpyBatch]] | None = None
    save: Callable[[int], None] | None = None  # save a checkpoint at this step
    log: Callable[[int, str, dict[str, float]], None] | None = None
    progress: Callable[[int, dict[str, float]], None] | None = None
    learning_rate: Callable[[int], float] | None = None
    generation: Callable[[int], dict[str, float]] | None = None  # evaluation by generation at this step
    # (step, its micro-batches) -> (the micro-batches to train on, metrics of the step); e.g. on-policy KD.
    # It must return the same metric keys on every step (the logging window averages them).
    prepare_step: Callable[[int, list[NumpyBatch]], tuple[list[NumpyBatch], dict[str, float]]] | None = None


def fit(trainer: Trainer, data_iter: Iterator[NumpyBatch], settings: LoopSettings, hooks: LoopHooks) -> dict[str, Any]:
    """Train from ``trainer.step`` to ``settings.total_steps``; returns the last train/eval metrics."""
    last_train: dict[str, float] = {}
    last_eval: dict[str, float] = {}
    window: list[dict[str, float]] = []
    t_window = time.perf_counter()
    while trainer.step < settings.total_steps:
        micro = take_micro_batches(data_iter, settings.grad_accum)
        if micro is None:
            logger.warning("the data ran out at step %d of %d", trainer.step, settings.total_steps)
            break
        step_before = trainer.step
        lr = hooks.learning_rate(step_before) if hooks.learning_rate else float("nan")
        extra: dict[str, float] = {}
        if hooks.prepare_step:
            micro, extra = hooks.prepare_step(step_before, micro)
        stats = trainer.train_step(micro)
        stats.update(extra)
        if not stats.pop("finite"):
            msg = (
                f"non-finite loss or gradient at step {trainer.step} (loss={stats['loss']}, "
                f"grad_norm={stats['grad_norm']}); the update was not applied."
            )
            if not settings.skip_nonfinite:
                raise NonFiniteError(
                    msg + " Lower the learning rate, check the data, or set skip_nonfinite_steps: true "
                    "to skip such steps."
                )
            logger.warning(msg + " Skipping it (skip_nonfinite_steps).")
        stats["learning_rate"] = lr
        window.append(stats)
        step = trainer.step
        if step % settings.logging_steps == 0 or step == settings.total_steps:
            elapsed = time.perf_counter() - t_window
            last_train = _summarize_window(window, elapsed)
            if hooks.log:
                hooks.log(step, "train", last_train)
            if hooks.progress:
                hooks.progress(step, {"loss": last_train["loss"], "tok/s": last_train["tokens_per_second"]})
            window, t_window = [], time.perf_counter()
        if (hooks.eval_batches or hooks.generation) and settings.eval_every and (
            step % settings.eval_every == 0 or step == settings.total_steps
        ):
            last_eval = trainer.evaluate(hooks.eval_batches()) if hooks.eval_batches else {}
            if hooks.generation:
                last_eval.update(hooks.generation(step))
            if hooks.log and last_eval:
                hooks.log(step, "eval", last_eval)
        if hooks.save and settings.save_every and step % settings.save_every == 0:
            hooks.save(step)
    return {"train": last_train, "eval": last_eval}


def _summarize_window(window: list[dict[str, float]], elapsed: float) -> dict[str, float]:
    """Average per-step metrics over the logging window; sums for token counts."""
    out = {k: float(np.mean([w[k] for w in window])) for k in window[0]}
    out["learning_rate"] = window[-1]["learning_rate"]
    tokens = sum(w["tokens"] for w in window)
    out["tokens"] = tokens
    out["trainable_tokens"] = sum(w["trainable_tokens"] for w in window)
    out.pop("num_items", None)
    out["step_time"] = elapsed / len(window)
    out["tokens_per_second"] = tokens / elapsed if elapsed > 0 else 0.0
    if "sampling_seconds" in out:  # on-policy KD: the share of step time spent sampling
        out["sampling_share"] = out["sampling_seconds"] / out["step_time"] if out["step_time"] > 0 else 0.0
    return out
