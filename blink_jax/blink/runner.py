"""What `Llava.__call__(blink=...)` and `Llava.generate(blink=...)` need around the jitted forward: the TokenSR to
run (built, or checked against the model), the static and traced halves of the config, and the host trace.

Static: the TokenSR graph definition and `BlinkStatic`. Traced: TokenSR parameters, the thresholds and the
random key, so new thresholds or new decisions never recompile (the entry points are in `blink_jax.runtime`).
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import numpy as np
from flax import nnx

from blink_jax.blink import dtr
from blink_jax.blink.config import BlinkConfig, BlinkStatic, Thresholds
from blink_jax.blink.forward import Trace
from blink_jax.blink.tokensr import TokenSRBank, check_geometry, check_state, trained


@dataclasses.dataclass(frozen=True)
class HostTrace:
    """A Blink trace on the host: numpy arrays [num_layers, B] plus the layer indices and action names."""
    layers: tuple[int, ...]
    rho: np.ndarray
    region: np.ndarray
    action: np.ndarray
    expanded_region: np.ndarray
    attention: np.ndarray | None = None

    def actions(self) -> list[list[str]]:
        """[layer][example] action names."""
        return dtr.action_names(self.action)

    def example(self, i: int) -> list[dict]:
        """One example's decisions, a dict per participating layer."""
        return [dict(layer=layer, rho=float(self.rho[j, i]), region=int(self.region[j, i]),
                     action=dtr.ACTION_NAMES[int(self.action[j, i])])
                for j, layer in enumerate(self.layers)]


def tokensr_bank(blink: BlinkConfig, dim: int, tokensr) -> TokenSRBank:
    """The TokenSR bank to run: built for `interp`, or the given (trained) bank / its state for a trained kind."""
    if not trained(blink.tokensr_kind):
        if tokensr is not None:
            raise ValueError(f"tokensr parameters were given but BlinkConfig.tokensr_kind={blink.tokensr_kind!r} has "
                             f"none: use the kind they were trained as (load_tokensr returns its config), or pass "
                             f"tokensr=None")
        return TokenSRBank(blink, dim, rngs=nnx.Rngs(0))
    if tokensr is None:
        raise ValueError(f"BlinkConfig.tokensr_kind={blink.tokensr_kind!r} needs trained TokenSR parameters: pass "
                         f"tokensr= (a TokenSRBank or its nnx.State, e.g. from train.tokensr's checkpoint), or use "
                         f"'interp'")
    if isinstance(tokensr, TokenSRBank):
        bank = tokensr
    else:  # a bare state: only its array shapes can be checked (scale and region size leave none: trust `blink`)
        check_state(blink, dim, tokensr)
        bank = nnx.eval_shape(lambda: TokenSRBank(blink, dim, rngs=nnx.Rngs(0)))
        nnx.update(bank, tokensr)
    check_geometry(blink, dim, bank)
    return bank


@functools.lru_cache(maxsize=32)
def _interp_bank(static, dim: int):
    """The parameter-free interp bank, built once per static config (saves host time on every call)."""
    return nnx.split(TokenSRBank(static, dim, rngs=nnx.Rngs(0)))


@dataclasses.dataclass(frozen=True)
class BlinkArgs:
    """What a jitted forward needs to run Blink: static parts (hashable) and traced parts."""
    bank_def: nnx.GraphDef  # static
    static: BlinkStatic  # static
    bank_state: nnx.State  # traced
    thresholds: Thresholds  # traced
    key: jax.Array  # traced


def prepare(blink: BlinkConfig, tokensr, rng, *, num_layers: int, grid: int | tuple[int, int],
            dim: int) -> BlinkArgs:
    """Checks `blink` against the model (layers, visual grid G or (Gh, Gw), hidden size) and builds the TokenSR
    to run."""
    if not isinstance(blink, BlinkConfig):
        raise TypeError(f"blink must be a BlinkConfig, got {type(blink).__name__}")
    blink.validate_for(num_layers, grid)
    static, thresholds = blink.split()
    if not trained(blink.tokensr_kind) and tokensr is None:
        bank_def, bank_state = _interp_bank(static, dim)
    else:
        bank_def, bank_state = nnx.split(tokensr_bank(blink, dim, tokensr))
    key = jax.random.key(0) if rng is None else rng
    return BlinkArgs(bank_def, static, bank_state, thresholds, key)


def to_host(trace: Trace, layers) -> HostTrace:
    get = lambda x: None if x is None else np.asarray(x)
    return HostTrace(layers=tuple(layers), rho=get(trace.rho), region=get(trace.region), action=get(trace.action),
                     expanded_region=get(trace.expanded_region), attention=get(trace.attention))
