"""The train state and the pure train step, after big_vision: shapes first (`eval_shape`), shardings inferred
from the logical-axis rules, the state born sharded by `jit(init, out_shardings=)`, and a step that donates it.

State: a plain dict `{"step": int32 [], "params": TokenSR params (pure dict), "opt_state": optax state}`.
The step's inputs are the frozen backbone's outputs, so only TokenSR is differentiated.

Letters: Lp participating layers, B batch, r region side, O = s r SR side, D model dim.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from blink_jax import sharding
from blink_jax.blink import BlinkConfig
from blink_jax.blink.tokensr import TokenSRBank
from blink_jax.training.loss import distill_loss
from blink_jax.training.optim import OptimConfig


def state_shardings(abstract_state: dict, tx: optax.GradientTransformation, mesh, rules=sharding.LOGICAL_RULES):
    """NamedShardings for the train state: parameters by their logical axes, optimiser moments like their
    parameters (`optax.tree_map_params`), everything else (counts, the step) replicated."""
    params_sh = sharding.param_shardings(abstract_state["params"], mesh, rules)
    rep = sharding.replicated(mesh)
    opt_sh = optax.tree_map_params(tx, lambda _, sh: sh, abstract_state["opt_state"], params_sh,
                                   transform_non_params=lambda _: rep)
    return {"step": rep, "params": params_sh, "opt_state": opt_sh}


def train_step(state: dict, hs_lr: jax.Array, target: jax.Array, *, graphdef, tx: optax.GradientTransformation,
               schedule: optax.Schedule, temperature: float, mse_weight: float) -> tuple[dict, dict]:
    """hs_lr [Lp, B, r, r, D], target [Lp, B, O, O, D] -> (new state, metrics)."""
    def loss_fn(params):
        bank = nnx.merge(graphdef, params)
        pred = jnp.stack([bank[layer](hs_lr[i]) for i, layer in enumerate(bank.layers)])  # [Lp, B, O, O, D]
        return distill_loss(pred, target, temperature=temperature, mse_weight=mse_weight)

    (loss, aux), grads = jax.value_and_grad(loss_fn, has_aux=True)(state["params"])
    updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
    params = optax.apply_updates(state["params"], updates)
    metrics = {"loss": loss, **aux, "grad_norm": optax.tree.norm(grads), "update_norm": optax.tree.norm(updates),
               "param_norm": optax.tree.norm(params), "lr": schedule(state["step"])}
    return {"step": state["step"] + 1, "params": params, "opt_state": opt_state}, metrics


@dataclasses.dataclass(frozen=True)
class TrainProgram:
    graphdef: nnx.GraphDef  # of the TokenSRBank
    tx: optax.GradientTransformation
    abstract_state: dict  # ShapeDtypeStructs carrying their shardings (the restore target)
    state_shardings: dict
    init: Callable[[], dict]  # () -> state, born sharded
    step: Callable  # (state, hs_lr, target) -> (state, metrics); donates state


@functools.lru_cache(maxsize=8)
def train_program(blink: BlinkConfig, dim: int, seed: int, optim: OptimConfig, temperature: float,
                  mse_weight: float, batch_sharding: jax.sharding.NamedSharding) -> TrainProgram:
    """Everything about the train state that follows from the configs, with jitted init and step. Cached, so
    runs in one process with equal configs share the compiled programs."""
    mesh = batch_sharding.mesh
    make_bank = lambda: TokenSRBank(blink, dim, rngs=nnx.Rngs(seed))
    graphdef = nnx.graphdef(nnx.eval_shape(make_bank))
    tx, schedule = optim.optimizer(), optim.schedule()

    def init():
        params = nnx.to_pure_dict(nnx.state(make_bank(), nnx.Param))
        return {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": tx.init(params)}

    abstract = jax.eval_shape(init)
    state_sh = state_shardings(abstract, tx, mesh)
    abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract, state_sh)
    step = functools.partial(train_step, graphdef=graphdef, tx=tx, schedule=schedule, temperature=temperature,
                             mse_weight=mse_weight)
    rep = sharding.replicated(mesh)
    return TrainProgram(
        graphdef=graphdef, tx=tx, abstract_state=abstract, state_shardings=state_sh,
        init=jax.jit(init, out_shardings=state_sh),
        step=jax.jit(step, in_shardings=(state_sh, batch_sharding, batch_sharding), out_shardings=(state_sh, rep),
                     donate_argnums=(0,)))
