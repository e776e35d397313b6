"""Jit-compiled Blink entry points behind `Llava.__call__(blink=...)` and `Llava.generate(blink=...)`.

Static: the model and TokenSR graph definitions and `BlinkStatic`. Traced: parameters, inputs, the
thresholds and the random key, so new thresholds or new decisions never recompile.
"""

from __future__ import annotations

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from blink_jax.blink import dtr
from blink_jax.blink.config import BlinkConfig
from blink_jax.blink.forward import Trace, blink_prefill as _blink_prefill_fn
from blink_jax.blink.tokensr import TokenSRBank
from blink_jax.model import forward


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
    """The TokenSR bank to run: built for `interp`, or the given (trained) bank / its state for `conv`."""
    if blink.tokensr_kind == "interp":
        if tokensr is not None:
            raise ValueError("tokensr parameters were given but BlinkConfig.tokensr_kind='interp' has none: "
                             "use tokensr_kind='conv' to run trained TokenSR, or pass tokensr=None")
        return TokenSRBank(blink, dim, rngs=nnx.Rngs(0))
    if tokensr is None:
        raise ValueError("BlinkConfig.tokensr_kind='conv' needs trained TokenSR parameters: pass tokensr= "
                         "(a TokenSRBank or its nnx.State, e.g. from train.tokensr's checkpoint), or use 'interp'")
    if isinstance(tokensr, TokenSRBank):
        bank = tokensr
    else:  # a bare state: only its array shapes can be checked (scale and region size leave none: trust `blink`)
        bank = nnx.eval_shape(lambda: TokenSRBank(blink, dim, rngs=nnx.Rngs(0)))
        expected = {p: tuple(v.shape) for p, v in nnx.to_flat_state(nnx.state(bank, nnx.Param))}
        given = {p: tuple(v.shape) for p, v in nnx.to_flat_state(tokensr)}
        if given != expected:
            wrong = sorted(set(given.items()) ^ set(expected.items()), key=str)[:4]
            raise ValueError(f"the TokenSR state does not fit BlinkConfig(layers={blink.layers}, tokensr_channels="
                             f"{blink.tokensr_channels}) on a model of hidden size {dim} (first differences, "
                             f"path and shape: {wrong}): pass the config it was trained with (load_tokensr returns "
                             f"both)")
        nnx.update(bank, tokensr)
    if tuple(bank.layers) != tuple(blink.layers):
        raise ValueError(f"the TokenSR parameters cover layers {tuple(bank.layers)} but BlinkConfig.layers="
                         f"{tuple(blink.layers)}: train TokenSR for these layers or use its layers")
    for layer in bank.layers:
        module = bank.for_layer(layer)
        if module.dim != dim:
            raise ValueError(f"the TokenSR of layer {layer} was trained for hidden size {module.dim} but this model's "
                             f"is {dim}: it belongs to another model; train TokenSR for this one")
        built = {"region_size": module.region_size, "scale": module.scale, "tokensr_kind": module.kind}
        if module.kind == "conv":
            built["tokensr_channels"] = module.conv1.out_features
        for field, value in built.items():
            if getattr(blink, field) != value:
                raise ValueError(f"the TokenSR of layer {layer} was built with {field}={value!r} but BlinkConfig."
                                 f"{field}={getattr(blink, field)!r}: use the config it was trained with "
                                 f"(`load_tokensr` returns it) or train TokenSR for this one")
    return bank


@functools.partial(jax.jit, static_argnames=("graphdef", "bank_def", "static"))
def _prefill(graphdef, params, bank_def, bank_state, ids, px, mask, thresholds, key, *, static):
    model, bank = nnx.merge(graphdef, params), nnx.merge(bank_def, bank_state)
    logits, _, trace = _blink_prefill_fn(model, bank, ids, px, mask, static, thresholds, key)
    return logits, trace  # no cache: nothing decodes after


@functools.partial(jax.jit, static_argnames=("graphdef", "bank_def", "static", "max_new_tokens", "eos_token_id",
                                             "pad_token_id"))
def _generate(graphdef, params, bank_def, bank_state, ids, px, mask, thresholds, key, *, static, max_new_tokens,
              eos_token_id, pad_token_id):
    model, bank = nnx.merge(graphdef, params), nnx.merge(bank_def, bank_state)
    logits, cache, trace = _blink_prefill_fn(model, bank, ids, px, mask, static, thresholds, key, all_logits=False)
    tokens = forward.greedy_decode(model, logits[:, -1], cache, max_new_tokens=max_new_tokens,
                                   eos_token_id=eos_token_id, pad_token_id=pad_token_id)
    return tokens, trace


@functools.lru_cache(maxsize=32)
def _interp_bank(static, dim: int):
    """The parameter-free interp bank, built once per static config (saves host time on every call)."""
    return nnx.split(TokenSRBank(static, dim, rngs=nnx.Rngs(0)))


def _prepare(llava, blink: BlinkConfig, tokensr, rng):
    cfg = llava.config
    if not isinstance(blink, BlinkConfig):
        raise TypeError(f"blink must be a BlinkConfig, got {type(blink).__name__}")
    blink.validate_for(cfg.text.num_hidden_layers, cfg.vision.grid)
    static, thresholds = blink.split()
    if blink.tokensr_kind == "interp" and tokensr is None:
        bank_def, bank_state = _interp_bank(static, cfg.text.hidden_size)
    else:
        bank_def, bank_state = nnx.split(tokensr_bank(blink, cfg.text.hidden_size, tokensr))
    key = jax.random.PRNGKey(0) if rng is None else rng
    return bank_def, bank_state, static, thresholds, key


def to_host(trace: Trace, layers) -> HostTrace:
    get = lambda x: None if x is None else np.asarray(x)
    return HostTrace(layers=tuple(layers), rho=get(trace.rho), region=get(trace.region), action=get(trace.action),
                     expanded_region=get(trace.expanded_region), attention=get(trace.attention))


def blink_prefill(llava, ids, px, mask, blink: BlinkConfig, tokensr, rng=None):
    from blink_jax.runtime import ModelOutput

    bank_def, bank_state, static, thresholds, key = _prepare(llava, blink, tokensr, rng)
    logits, trace = _prefill(llava.graphdef, llava.params, bank_def, bank_state, ids, px, mask, thresholds, key,
                                static=static)
    return ModelOutput(logits=logits, trace=to_host(trace, blink.layers))


def blink_generate(llava, ids, px, mask, blink: BlinkConfig, tokensr, *, max_new_tokens, eos_token_id, pad_token_id,
                   rng=None):
    bank_def, bank_state, static, thresholds, key = _prepare(llava, blink, tokensr, rng)
    tokens, trace = _generate(llava.graphdef, llava.params, bank_def, bank_state, ids, px, mask, thresholds, key,
                              static=static, max_new_tokens=max_new_tokens, eos_token_id=eos_token_id,
                              pad_token_id=pad_token_id)
    return np.asarray(tokens), to_host(trace, blink.layers)
