"""The train state and the pure train step, after big_vision: shapes first (`eval_shape`), shardings inferred
from the logical-axis rules, the state born sharded by `jit(init, out_shardings=)`, and a step that donates it.

State: a plain dict `{"step": int32 [], "params": TokenSR params (pure dict), "opt_state": optax state}`.
The step's inputs are the frozen backbone's outputs, so only TokenSR is differentiated.

Letters: Lp participating layers, B batch, r region side, O = s r SR side, D model dim.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import optax
from flax import nnx

from blink_jax.blink.tokensr import TokenSRBank
from train import sharding
from train.loss import distill_loss


def bank_init_fn(blink, dim: int, seed: int):
    """() -> (graphdef, params): a fresh TokenSR bank (conv3 zero, so it starts as Blink-interp)."""
    def init():
        return nnx.to_pure_dict(nnx.state(TokenSRBank(blink, dim, rngs=nnx.Rngs(seed)), nnx.Param))
    graphdef = nnx.graphdef(nnx.eval_shape(lambda: TokenSRBank(blink, dim, rngs=nnx.Rngs(seed))))
    return graphdef, init


def state_shardings(abstract_state: dict, tx: optax.GradientTransformation, mesh, rules=sharding.LOGICAL_RULES):
    """NamedShardings for the train state: parameters by their logical axes, optimiser moments like their
    parameters (`optax.tree_map_params`), everything else (counts, the step) replicated."""
    params_sh = sharding.param_shardings(abstract_state["params"], mesh, rules)
    rep = sharding.replicated(mesh)
    opt_sh = optax.tree_map_params(tx, lambda _, sh: sh, abstract_state["opt_state"], params_sh,
                                   transform_non_params=lambda _: rep)
    return {"step": rep, "params": params_sh, "opt_state": opt_sh}


def make_init(init_params, tx):
    def init():
        params = init_params()
        return {"step": jnp.zeros((), jnp.int32), "params": params, "opt_state": tx.init(params)}
    return init


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
    metrics = {"loss": loss, **aux, "grad_norm": optax.global_norm(grads), "update_norm": optax.global_norm(updates),
               "param_norm": optax.global_norm(params), "lr": schedule(state["step"])}
    return {"step": state["step"] + 1, "params": params, "opt_state": opt_state}, metrics


def jit_train_step(*, graphdef, tx, schedule, temperature: float, mse_weight: float, state_sh, batch_sh):
    """The jitted step: state donated, shardings pinned on both sides, metrics replicated."""
    fn = functools.partial(train_step, graphdef=graphdef, tx=tx, schedule=schedule, temperature=temperature,
                           mse_weight=mse_weight)
    rep = sharding.replicated(batch_sh.mesh)
    return jax.jit(fn, in_shardings=(state_sh, batch_sh, batch_sh), out_shardings=(state_sh, rep),
                   donate_argnums=(0,))
