"""TokenSR inputs (BLINK.md §5): the region each (layer, example) trains on, and hs_LR = h_L[region](image).

One jitted vanilla probe of the frozen backbone gives, per participating layer L, the visual grid's output
hidden states and the SGS region r* of the prompt's last token; a (layer, example) then takes a uniformly
random region instead with probability `p_random_region`. Random draws come from (seed, step) and the
global batch shape only, so they do not depend on the mesh or on where a run was resumed.

Letters: Lp participating layers, B batch, Gh x Gw the visual grid, r region side, D model dim.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
from flax import nnx, struct

from blink_jax.blink.dtr import gather_region
from blink_jax.blink.probe import probe_layers
from blink_jax.model_inputs import prompt_kwargs


@struct.dataclass
class StudentInputs:
    hs_lr: jax.Array  # [Lp, B, r, r, D] float32
    region: jax.Array  # [Lp, B] int32: the region trained on
    rho: jax.Array  # [Lp, B] float32: SGS concentration, for the logs
    random: jax.Array  # [Lp, B] bool: region drawn at random instead of r*


@functools.partial(jax.jit, static_argnames=("graphdef", "grid", "layers", "region_size", "lr_sharding",
                                             "region_sharding"))
def student_inputs(graphdef, params, input_ids, pixel_values, attention_mask, extra, step, p_random, seed, *,
                   grid: tuple[int, int] | None, layers: tuple[int, ...], region_size: int, lr_sharding,
                   region_sharding) -> StudentInputs:
    """input_ids / attention_mask [B, T] (left-padded prompt with the question), pixel_values as the backbone takes
    them, `extra` / `grid` the rest of its prompt's inputs (`blink_jax.model_inputs.ModelInputs`); step, seed: int32 [],
    p_random: float32 [] (traced: changing them does not recompile the probe)."""
    model = nnx.merge(graphdef, params)
    probe = probe_layers(model, input_ids, pixel_values, attention_mask, layers=layers, region_size=region_size,
                         **prompt_kwargs(extra, grid))
    gh, gw = probe.visual.shape[2:4]
    num_regions = (gh // region_size) * (gw // region_size)
    key = jax.random.fold_in(jax.random.key(seed), step)
    k_use, k_region = jax.random.split(key)
    shape = probe.region.shape  # [Lp, B]
    use_random = jax.random.bernoulli(k_use, p_random, shape)
    drawn = jax.random.randint(k_region, shape, 0, num_regions, dtype=jnp.int32)
    region = jnp.where(use_random, drawn, probe.region).astype(jnp.int32)
    hs_lr = jax.vmap(lambda h, r: gather_region(h, r, region_size))(probe.visual, region)  # [Lp, B, r, r, D]
    constrain = jax.lax.with_sharding_constraint
    return StudentInputs(
        hs_lr=constrain(hs_lr.astype(jnp.float32), lr_sharding),
        region=constrain(region, region_sharding),
        rho=constrain(probe.rho.astype(jnp.float32), region_sharding),
        random=constrain(use_random, region_sharding),
    )
