"""Dynamic token resolution (DTR, BLINK.md §3): the per-example state machine and SR bookkeeping.

Pure, jit-able, batched functions with static shapes; thresholds are traced arrays. Einsum letters:
  B batch, Gh x Gw the visual grid (G x G when square, given as an int), D model dim, R regions ((Gh/r) (Gw/r)),
  P SR tokens ((s r)^2), V visual tokens (Gh*Gw).

State per example: `expanded` [B] bool and `region` [B] int32 (the expanded region, `NO_REGION`
when idle). At participating layer L, `decide` turns (rho, r*) from layer L's attention into an
action that shapes the sequence entering layer L+1:

  NONE    idle, stays idle                      SR slots invalid
  EXPAND  SR tokens := TokenSR_L(h_L[region])   SR slots valid, contents and position ids replaced
  KEEP    expanded, stays expanded              SR slots valid, contents carried on by the layers
  DROP    expanded -> idle                      SR slots invalid from layer L+1 on

Typical use inside the forward, per participating layer L (Python-unrolled, all traced):

  rho, r_star, s_v = saliency_guided_scan(...)
  if static.random_region: r_star = random_regions(fold_in(key, L), B, R)
  action, state = step(state, rho, r_star, thresholds, static)
  lr = gather_region(gather_visual(h, visual_index, (Gh, Gw)), state.region, r)   # [B, r, r, D]
  sr_h = select_on_expand(action, bank.for_layer(L)(lr).reshape(B, P, D), sr_h)
  sr_pos = where(action == EXPAND, sr_position_ids(pos[..., visual], state.region, (Gh, Gw), r, s), sr_pos)
  sr_valid = state.expanded                                                   # [B]: EXPAND or KEEP
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp

from blink_jax.blink.config import grid_shape

Grid = int | tuple[int, int]  # a visual grid: G (square G x G) or (Gh, Gw)

NONE, EXPAND, KEEP, DROP = 0, 1, 2, 3
ACTION_NAMES = ("none", "expand", "keep", "drop")
NO_REGION = -1  # `region` of an idle example


class DTRState(NamedTuple):
    """Per-example DTR state, a pytree: carried across participating layers."""

    expanded: jax.Array  # [B] bool
    region: jax.Array  # [B] int32, NO_REGION when not expanded


def init_state(batch: int) -> DTRState:
    return DTRState(jnp.zeros((batch,), bool), jnp.full((batch,), NO_REGION, jnp.int32))


def decide(
    rho: jax.Array,  # [B]
    region_star: jax.Array,  # [B] int
    expanded: jax.Array,  # [B] bool
    current_region: jax.Array,  # [B] int
    tau_exp: jax.Array,  # [] or [B], traced
    tau_drop: jax.Array,  # [] or [B], traced
    *,
    drop: bool,
    reexpand: str,
    fixed: bool,
) -> tuple[jax.Array, jax.Array, jax.Array]:  # action [B] int32, new_expanded [B] bool, new_region [B] int32
    """One DTR transition (BLINK.md §3).

    rho > tau_exp: EXPAND at r* (if already expanded: "refocus" -> EXPAND at the new r*,
      "hold" -> KEEP the old region).
    rho < tau_drop and expanded: DROP (KEEP when `drop` is False).
    otherwise: KEEP if expanded else NONE.
    `fixed` (the w/o-DTR ablation): EXPAND at r* at every participating layer; rho, the thresholds,
      `drop` and `reexpand` are ignored.
    `new_region` is NO_REGION wherever `new_expanded` is False.
    """
    if reexpand not in ("refocus", "hold"):
        raise ValueError(f"reexpand={reexpand!r} is unknown; use 'refocus' or 'hold'")
    region_star = region_star.astype(jnp.int32)
    current_region = current_region.astype(jnp.int32)
    if fixed:
        action = jnp.full(rho.shape, EXPAND, jnp.int32)
        return action, jnp.ones(rho.shape, bool), region_star

    expand = (rho > tau_exp) & ~(expanded & (reexpand == "hold"))
    dropping = (rho < tau_drop) & expanded & drop & ~(rho > tau_exp)
    action = jnp.where(expanded, KEEP, NONE)
    action = jnp.where(dropping, DROP, action)
    action = jnp.where(expand, EXPAND, action).astype(jnp.int32)

    new_expanded = (action == EXPAND) | (action == KEEP)
    new_region = jnp.where(action == EXPAND, region_star, current_region)
    new_region = jnp.where(new_expanded, new_region, NO_REGION).astype(jnp.int32)
    return action, new_expanded, new_region


def step(
    state: DTRState,
    rho: jax.Array,  # [B]
    region_star: jax.Array,  # [B] int
    thresholds,  # Thresholds(tau_exp, tau_drop), traced
    static,  # BlinkStatic (or BlinkConfig): drop, reexpand, fixed
) -> tuple[jax.Array, DTRState]:  # action [B] int32, new state
    """`decide` on a `DTRState` with the policy taken from the static config."""
    action, expanded, region = decide(
        rho, region_star, state.expanded, state.region, thresholds.tau_exp, thresholds.tau_drop,
        drop=static.drop, reexpand=static.reexpand, fixed=static.fixed,
    )
    return action, DTRState(expanded, region)


def select_on_expand(action: jax.Array, new: jax.Array, old: jax.Array) -> jax.Array:
    """Per example: `new` where the action is EXPAND (fresh SR tokens / positions), else `old`.

    `new`, `old`: [B, ...] of the same shape (e.g. SR hidden states [B, P, D] or position ids [B, P]).
    """
    mask = (action == EXPAND).reshape(action.shape + (1,) * (new.ndim - 1))
    return jnp.where(mask, new, old)


def is_key_batch(key: jax.Array) -> bool:
    """True for one PRNG key per example ([B] typed keys or [B, 2] raw uint32 keys), False for a single key."""
    typed = jax.dtypes.issubdtype(key.dtype, jax.dtypes.prng_key)
    return key.ndim == (1 if typed else 2)


def fold_in(key: jax.Array, data: int) -> jax.Array:
    """`jax.random.fold_in` of a single key or of each key of a per-example batch."""
    return jax.vmap(lambda k: jax.random.fold_in(k, data))(key) if is_key_batch(key) else jax.random.fold_in(key, data)


def random_regions(key: jax.Array, batch: int, num_regions: int) -> jax.Array:  # [B] int32
    """Uniform regions for the w/o-SGS ablation. Fold the layer index into `key` per layer.

    `key`: one key for the batch, or one per example ([B] keys), which makes each example's region a function
    of its own key alone, whatever else shares its batch (what a resumable eval needs)."""
    if is_key_batch(key):
        if key.shape[0] != batch:
            raise ValueError(f"random_regions got {key.shape[0]} per-example keys for a batch of {batch}")
        return jax.vmap(lambda k: jax.random.randint(k, (), 0, num_regions, dtype=jnp.int32))(key)
    return jax.random.randint(key, (batch,), 0, num_regions, dtype=jnp.int32)


def gather_visual(
    h: jax.Array,  # [B, T, D] hidden states of the whole buffer
    visual_index: jax.Array,  # [B, V] int, row-major grid order
    grid: Grid,
) -> jax.Array:  # [B, Gh, Gw, D]
    """The Gh x Gw grid of visual-token hidden states, from per-example buffer positions."""
    b, _, d = h.shape
    idx = visual_index.astype(jnp.int32)[:, :, None]
    return jnp.take_along_axis(h, idx, axis=1).reshape(b, *grid_shape(grid), d)


def take_slots(x: jax.Array, index: jax.Array) -> jax.Array:
    """x [..., B, S] (position ids, with or without M-RoPE's leading axis of 3) at per-example slots [B, N]
    -> [..., B, N]."""
    index = jnp.broadcast_to(index.astype(jnp.int32), x.shape[:-1] + index.shape[-1:])
    return jnp.take_along_axis(x, index, axis=-1)


def region_origin(region: jax.Array, grid: Grid, region_size: int) -> tuple[jax.Array, jax.Array]:
    """Top-left grid cell (row0, col0) of each region, row-major over the (Gh/r) x (Gw/r) region grid."""
    per_row = grid_shape(grid)[1] // region_size
    region = region.astype(jnp.int32)
    return (region // per_row) * region_size, (region % per_row) * region_size


def region_box(region: int, grid: Grid, region_size: int, patch: int) -> tuple[int, int, int, int]:
    """Host-side: (left, top, right, bottom) pixel box of `region` on the preprocessed image (Gh p x Gw p pixels,
    p the side of one grid cell in pixels), right/bottom exclusive; row-major over the region grid, as
    `region_origin`."""
    per_row = grid_shape(grid)[1] // region_size
    row, col = divmod(int(region), per_row)
    side = region_size * patch
    return col * side, row * side, (col + 1) * side, (row + 1) * side


def gather_region(
    h_visual: jax.Array,  # [B, Gh, Gw, D]
    region: jax.Array,  # [B] int
    region_size: int,
) -> jax.Array:  # [B, r, r, D]
    """hs_LR: the r x r block of visual hidden states at each example's region.

    An out-of-range region (e.g. NO_REGION of an idle example) gives a clamped, finite block: mask it.
    """
    gh, gw, d = h_visual.shape[1:]
    row0, col0 = region_origin(region, (gh, gw), region_size)

    def one(h, r0, c0):
        return jax.lax.dynamic_slice(h, (r0, c0, 0), (region_size, region_size, d))

    return jax.vmap(one)(h_visual, row0, col0)


def sr_source_index(
    region: jax.Array,  # [B] int
    grid: Grid,
    region_size: int,
    scale: int,
) -> jax.Array:  # [B, P] int32
    """Flat visual index (row-major over Gh x Gw) of the source token of each SR token.

    SR token at fine cell (i, j), row-major over the (s r) x (s r) grid, comes from grid cell
    (row0 + i // s, col0 + j // s).
    """
    side = scale * region_size
    width = grid_shape(grid)[1]
    row0, col0 = region_origin(region, grid, region_size)
    fine = jnp.arange(side, dtype=jnp.int32) // scale  # [s r]
    rows = row0[:, None, None] + fine[None, :, None]  # [B, s r, 1]
    cols = col0[:, None, None] + fine[None, None, :]  # [B, 1, s r]
    return (rows * width + cols).reshape(region.shape[0], side * side)


def fractional_offsets(region_size: int, scale: int) -> jax.Array:  # [2, P] float32
    """(h, w) offsets of the SR tokens from their source token under `sr_positions="fractional"` (BLINK.md §10):
    fine cell (i, j) sits at the centre of its 1/s sub-cell, (i mod s + 0.5) / s - 0.5 rows down, likewise across."""
    side = scale * region_size
    sub = (jnp.arange(side, dtype=jnp.float32) % scale + 0.5) / scale - 0.5  # [s r]
    rows = jnp.broadcast_to(sub[:, None], (side, side)).reshape(-1)
    cols = jnp.broadcast_to(sub[None, :], (side, side)).reshape(-1)
    return jnp.stack([rows, cols])


def sr_position_ids(
    visual_pos: jax.Array,  # [B, V] or [3, B, V] (M-RoPE t, h, w): position ids of the visual tokens, row-major
    region: jax.Array,  # [B] int
    grid: Grid,
    region_size: int,
    scale: int,
    mode: str = "source",
) -> jax.Array:  # [B, P] or [3, B, P]: visual_pos's dtype ("source"), float32 ("fractional")
    """Position ids of the SR tokens: those of their source visual tokens (BLINK.md §3, ours), or under M-RoPE with
    `mode="fractional"` the source's (t, h, w) with h and w moved to the fine cell's centre (BLINK.md §10, ours)."""
    source = take_slots(visual_pos, sr_source_index(region, grid, region_size, scale))
    if mode == "source":
        return source
    if mode != "fractional":
        raise ValueError(f"sr_positions={mode!r} is unknown; use 'source' or 'fractional'")
    if visual_pos.ndim != 3 or visual_pos.shape[0] != 3:
        raise ValueError(f"sr_positions='fractional' needs M-RoPE positions [3, B, V] (t, h, w), got "
                         f"{visual_pos.shape}: 1-D positions (LLaVA) take sr_positions='source'")
    offsets = fractional_offsets(region_size, scale)  # [2, P]
    shift = jnp.concatenate([jnp.zeros_like(offsets[:1]), offsets])[:, None, :]  # [3, 1, P]: t stays
    return source.astype(jnp.float32) + shift


def action_names(action) -> list[list[str]]:
    """Host-side: nested lists of action names, e.g. for a trace printout (not for use under jit)."""
    import numpy as np

    a = np.asarray(action)
    return np.vectorize(lambda i: ACTION_NAMES[i], otypes=[object])(a).tolist()
