"""The runnable model: jit-compiled pure entry points over `(params, inputs)`, and greedy generation.

`Llava` holds `nnx.split(model)` once; each entry point merges inside `jax.jit`, so compilation is
keyed only on shapes and static options, never on parameter values or thresholds. One pair of entry points
(`_prefill`, `_generate`) serves vanilla (`static=None`) and Blink.
"""

from __future__ import annotations

import dataclasses
import functools
import os
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from blink_jax import sharding
from blink_jax.blink import runner
from blink_jax.blink.forward import blink_prefill
from blink_jax.config import LlavaConfig
from blink_jax.model import forward
from blink_jax.model.llava import LlavaModel


@dataclasses.dataclass(frozen=True)
class ModelOutput:
    logits: Any  # [B, T, V] float32, at the prompt's own positions
    trace: Any = None  # Blink's per-layer decisions, None for vanilla


class InputError(ValueError):
    """Model inputs that cannot be run: names the array and what is wrong."""


def _forward(graphdef, params, bank_def, bank_state, ids, px, mask, thresholds, key, static, *, all_logits, scan):
    """The prefill, vanilla (`static is None`) or Blink's. -> (logits, KVCache, Trace or None)."""
    model = nnx.merge(graphdef, params)
    if static is None:
        return forward.prefill(model, ids, px, mask, all_logits=all_logits, scan=scan) + (None,)
    return blink_prefill(model, nnx.merge(bank_def, bank_state), ids, px, mask, static, thresholds, key,
                         all_logits=all_logits, scan=scan)


@functools.partial(jax.jit, static_argnames=("graphdef", "bank_def", "static", "scan"))
def _prefill(graphdef, params, bank_def, bank_state, ids, px, mask, thresholds, key, *, static, scan=False):
    logits, _, trace = _forward(graphdef, params, bank_def, bank_state, ids, px, mask, thresholds, key, static,
                                all_logits=True, scan=scan)
    return logits, trace  # no cache: nothing decodes after


@functools.partial(jax.jit, static_argnames=("graphdef", "bank_def", "static", "max_new_tokens", "eos_token_id",
                                             "pad_token_id", "scan"))
def _generate(graphdef, params, bank_def, bank_state, ids, px, mask, thresholds, key, *, static, max_new_tokens,
              eos_token_id, pad_token_id, scan=False):
    logits, cache, trace = _forward(graphdef, params, bank_def, bank_state, ids, px, mask, thresholds, key, static,
                                    all_logits=False, scan=scan)
    model = nnx.merge(graphdef, params)
    tokens = forward.greedy_decode(model, logits[:, -1], cache, max_new_tokens=max_new_tokens,
                                   eos_token_id=eos_token_id, pad_token_id=pad_token_id)
    return tokens, trace


class Llava:
    """LLaVA-1.5 ready to run. `out = model(input_ids=..., pixel_values=..., attention_mask=...)`.

    pixel_values: [B, C, H, W], one `<image>` run per prompt; or [B, N, C, H, W], N runs per prompt filled in
    order (vanilla only: Blink takes one image)."""

    def __init__(self, model: LlavaModel, model_dir: str | os.PathLike | None = None, *, scan_layers: bool = False,
                 mesh: jax.sharding.Mesh | None = None):
        """`scan_layers=True` compiles the prefill's layers outside Blink's window as one `jax.lax.scan` (a
        smaller program, faster to compile; same numbers): bench/RESULTS.md has the compile and run times.
        `mesh`: the mesh the parameters are sharded on (`load_pretrained(..., mesh=)`); inputs are then put on it
        with their batch axis split over the batch axes, and with several hosts each host passes and gets back
        its own rows."""
        self.config: LlavaConfig = model.config
        self.scan_layers = scan_layers
        self.mesh = mesh
        self.graphdef, self.params = nnx.split(model)
        self.model_dir = model_dir

    @property
    def module(self) -> LlavaModel:
        return nnx.merge(self.graphdef, self.params)

    def check_inputs(self, input_ids, pixel_values, attention_mask):
        """Host-side validation with errors that name the problem. Returns device-ready arrays."""
        cfg = self.config
        input_ids = np.asarray(input_ids)
        if input_ids.ndim != 2:
            raise InputError(f"input_ids must be [batch, length], got shape {input_ids.shape}")
        attention_mask = np.ones_like(input_ids) if attention_mask is None else np.asarray(attention_mask)
        if attention_mask.shape != input_ids.shape:
            raise InputError(f"attention_mask has shape {attention_mask.shape}, input_ids {input_ids.shape}")
        if (attention_mask[:, -1] == 0).any():
            raise InputError("attention_mask ends in padding: pad on the left (tokenizer.padding_side='left')")
        if ((input_ids < 0) | (input_ids >= cfg.text.vocab_size)).any():
            raise InputError(f"input_ids hold ids outside the vocabulary [0, {cfg.text.vocab_size})")
        if isinstance(pixel_values, jax.Array):  # already on the device: no round trip through the host
            pixel_values = pixel_values.astype(jnp.float32)
        else:
            pixel_values = np.asarray(pixel_values, dtype=np.float32)
        size = cfg.vision.image_size
        image = (cfg.vision.num_channels, size, size)
        if pixel_values.shape[:1] + pixel_values.shape[-3:] != (input_ids.shape[0], *image) or \
                pixel_values.ndim not in (4, 5):
            raise InputError(f"pixel_values has shape {pixel_values.shape}, expected {(input_ids.shape[0], *image)} "
                             f"([B, C, H, W]) or [B, N, C, H, W] for N images per prompt")
        images = 1 if pixel_values.ndim == 4 else pixel_values.shape[1]
        counts = ((input_ids == cfg.image_token_index) & (attention_mask > 0)).sum(axis=1)
        for row, count in enumerate(counts):
            if count != images * cfg.num_image_tokens:
                runs = "exactly one '<image>'" if images == 1 else f"{images} '<image>'s (pixel_values has N={images})"
                raise InputError(
                    f"input_ids row {row} holds {count} image tokens (id {cfg.image_token_index}), expected "
                    f"{images * cfg.num_image_tokens}: the prompt needs {runs}, expanded by the processor")
        if self.mesh is not None:
            put = lambda x, axes: sharding.put_rows(x, self.mesh, axes)
            image_axes = ("batch",) + (None,) * (pixel_values.ndim - 1)  # [B, C, H, W] or [B, N, C, H, W]
            return (put(input_ids.astype(np.int32), sharding.TOKEN_AXES), put(pixel_values, image_axes),
                    put(attention_mask.astype(np.int32), sharding.TOKEN_AXES))
        return jnp.asarray(input_ids, jnp.int32), jnp.asarray(pixel_values), jnp.asarray(attention_mask, jnp.int32)

    def __call__(self, *, input_ids, pixel_values, attention_mask=None, blink=None, tokensr=None,
                 rng=None) -> ModelOutput:
        """Prefill logits [B, T, V]. `blink=BlinkConfig(...)` runs Blink (`out.trace` holds its decisions);
        `tokensr` is the trained TokenSR (bank or state) for tokensr_kind='conv'; `rng` seeds the random-region
        ablation: one PRNG key, or one per example ([B] keys) to make each example's draw independent of its
        batch."""
        ids, px, mask = self.check_inputs(input_ids, pixel_values, attention_mask)
        _one_image_for_blink(px, blink)
        b = self._blink_args(blink, tokensr, rng)
        logits, trace = _prefill(self.graphdef, self.params, b.bank_def, b.bank_state, ids, px, mask, b.thresholds,
                                 b.key, static=b.static, scan=self.scan_layers)
        if self.mesh is not None and jax.process_count() > 1:
            logits = sharding.host_rows(logits, self.mesh, ("batch", None, None))
        return ModelOutput(logits=logits, trace=None if blink is None else self._host_trace(trace, blink.layers))

    def generate(self, *, input_ids, pixel_values, attention_mask=None, max_new_tokens: int = 16,
                 blink=None, tokensr=None, rng=None, eos_token_id: int | None = None,
                 pad_token_id: int | None = None, return_trace: bool = False):
        """Greedy decoding. -> np.ndarray [B, max_new_tokens] int32, padded with `pad_token_id` after EOS
        (and Blink's trace of the prefill with `return_trace=True`)."""
        ids, px, mask = self.check_inputs(input_ids, pixel_values, attention_mask)
        _one_image_for_blink(px, blink)
        text = self.config.text
        eos = text.eos_token_id if eos_token_id is None else eos_token_id
        pad = (text.pad_token_id if text.pad_token_id is not None else 0) if pad_token_id is None else pad_token_id
        eos = -1 if eos is None else eos
        b = self._blink_args(blink, tokensr, rng)
        tokens, trace = _generate(self.graphdef, self.params, b.bank_def, b.bank_state, ids, px, mask, b.thresholds,
                                  b.key, static=b.static, max_new_tokens=max_new_tokens, eos_token_id=eos,
                                  pad_token_id=pad, scan=self.scan_layers)
        tokens = np.asarray(tokens) if self.mesh is None else sharding.host_rows(tokens, self.mesh, sharding.TOKEN_AXES)
        if not return_trace:
            return tokens
        return tokens, None if blink is None else self._host_trace(trace, blink.layers)

    def _host_trace(self, trace, layers) -> runner.HostTrace:
        """The trace's rows of this host's examples ([Lp, B, ...] leaves), on the host."""
        if self.mesh is not None and jax.process_count() > 1:
            rows = lambda x: sharding.host_rows(x, self.mesh, ("layers", "batch") + (None,) * (x.ndim - 2))
            trace = jax.tree.map(rows, trace)
        return runner.to_host(trace, layers)

    def _blink_args(self, blink, tokensr, rng) -> runner.BlinkArgs:
        """Blink's static and traced arguments of the entry points; all None for vanilla."""
        if blink is None:
            return runner.BlinkArgs(None, None, None, None, None)
        b = runner.prepare(blink, tokensr, rng, num_layers=self.config.text.num_hidden_layers,
                           grid=self.config.vision.grid, dim=self.config.text.hidden_size)
        if self.mesh is None:
            return b
        # Every argument must live on the mesh (a trained TokenSR is loaded onto one device; with several hosts
        # each argument must be a global array): TokenSR and thresholds are alike on every host, replicated;
        # per-example keys ([B]) are this host's rows, like the inputs.
        key = b.key
        rows = ("batch", None) if key.ndim == 1 else (None,) * (key.ndim + 1)
        data = np.asarray(jax.random.key_data(key))
        data = sharding.put_rows(data, self.mesh, rows) if key.ndim == 1 else sharding.replicate(data, self.mesh)
        return dataclasses.replace(
            b, bank_state=jax.tree.map(lambda x: sharding.replicate(x, self.mesh), b.bank_state),
            thresholds=jax.tree.map(lambda x: sharding.replicate(x, self.mesh), b.thresholds),
            key=jax.random.wrap_key_data(data, impl=jax.random.key_impl(key)))


def _one_image_for_blink(pixel_values, blink) -> None:
    if blink is not None and pixel_values.ndim != 4:
        raise InputError(f"Blink runs on one image per prompt, got pixel_values of shape {pixel_values.shape}: pass "
                         f"[B, C, H, W], or blink=None for several images")


def generate(model: Llava, **kwargs) -> np.ndarray:
    """`blink_jax.generate(model, input_ids=..., pixel_values=..., attention_mask=..., max_new_tokens=16)`."""
    return model.generate(**kwargs)
