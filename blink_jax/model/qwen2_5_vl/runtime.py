"""Qwen2.5-VL ready to run, as `blink_jax.runtime.Llava` for LLaVA: jit-compiled prefill and greedy generation,
vanilla or with Blink (`blink=BlinkConfig(...)`), over `(params, inputs)`; thresholds are traced, so changing them
never recompiles. Programs are keyed on the batch's grid shape (Gh, Gw) and prompt length.

On a mesh (`blink_jax.load_pretrained(..., mesh=)`) the parameters are sharded as the rules table says and the
inputs (whose images are packed across the batch) are replicated: one process, every device holding the batch.
"""

from __future__ import annotations

import dataclasses
import functools
import os

import jax
import numpy as np
from flax import nnx

from blink_jax import sharding
from blink_jax.blink import runner
from blink_jax.blink.forward import blink_prefill
from blink_jax.model import forward
from blink_jax.model.qwen2_5_vl import forward as qwen_forward
from blink_jax.model.qwen2_5_vl.config import Qwen25VLConfig
from blink_jax.model.qwen2_5_vl.forward import QwenInputs, prepare_inputs
from blink_jax.model.qwen2_5_vl.model import Qwen25VLModel
from blink_jax.runtime import InputError, ModelOutput


def _qwen_forward(graphdef, params, bank_def, bank_state, inputs: QwenInputs, thresholds, key, static, grid, *,
                  all_logits):
    """Qwen2.5-VL's prefill, vanilla (`static is None`) or Blink's on the batch's one grid (Gh, Gw).
    -> (logits, KVCache continuing at transformers' next M-RoPE position, Trace or None)."""
    model = nnx.merge(graphdef, params)
    if static is None:
        return qwen_forward.prefill(model, inputs, all_logits=all_logits) + (None,)
    logits, cache, trace = blink_prefill(
        model, nnx.merge(bank_def, bank_state), inputs.input_ids, inputs.pixel_values, inputs.attention_mask, static,
        thresholds, key, all_logits=all_logits, layout=inputs.layout, positions=inputs.positions, grid=grid)
    return logits, cache.replace(next_position=inputs.next_position), trace


@functools.partial(jax.jit, static_argnames=("graphdef", "bank_def", "static", "grid"))
def _qwen_prefill(graphdef, params, bank_def, bank_state, inputs, thresholds, key, *, static, grid):
    logits, _, trace = _qwen_forward(graphdef, params, bank_def, bank_state, inputs, thresholds, key, static, grid,
                                     all_logits=True)
    return logits, trace


@functools.partial(jax.jit, static_argnames=("graphdef", "bank_def", "static", "grid", "max_new_tokens",
                                             "eos_token_id", "pad_token_id"))
def _qwen_generate(graphdef, params, bank_def, bank_state, inputs, thresholds, key, *, static, grid, max_new_tokens,
                   eos_token_id, pad_token_id):
    logits, cache, trace = _qwen_forward(graphdef, params, bank_def, bank_state, inputs, thresholds, key, static,
                                         grid, all_logits=False)
    tokens = forward.greedy_decode(nnx.merge(graphdef, params), logits[:, -1], cache, max_new_tokens=max_new_tokens,
                                   eos_token_id=eos_token_id, pad_token_id=pad_token_id)
    return tokens, trace


class Qwen:
    """Qwen2.5-VL ready to run, as `Llava`: `out = model(**batch, blink=BlinkConfig(...))` with `batch` the
    `QwenProcessor`'s output (input_ids, attention_mask, pixel_values, image_grid_thw).

    Blink needs one visual grid per batch: resize the images to one grid shape (`QwenProcessor` with
    `grid_shapes`, batches grouped by `grid_of`). One program is compiled per (grid shape, prompt length)."""

    def __init__(self, model: Qwen25VLModel, model_dir: str | os.PathLike | None = None, *,
                 mesh: jax.sharding.Mesh | None = None):
        """`mesh`: the mesh the parameters are sharded on (`load_pretrained(..., mesh=)`); inputs, TokenSR and
        thresholds are then replicated on it. One process only: the packed images do not split by host rows."""
        if mesh is not None and jax.process_count() > 1:
            raise sharding.MeshError(f"Qwen2.5-VL on a mesh runs in one process, not {jax.process_count()}: its "
                                     f"images are packed across the batch, which does not split into host rows")
        self.config: Qwen25VLConfig = model.config
        self.graphdef, self.params = nnx.split(model)
        self.model_dir = model_dir
        self.mesh = mesh

    def _replicated(self, tree):
        """`tree`'s arrays on every device of the mesh (as they are without one). PRNG keys go through their data."""
        if self.mesh is None:
            return tree

        def put(x):
            if isinstance(x, jax.Array) and jax.dtypes.issubdtype(x.dtype, jax.dtypes.prng_key):
                data = sharding.replicate(np.asarray(jax.random.key_data(x)), self.mesh)
                return jax.random.wrap_key_data(data, impl=jax.random.key_impl(x))
            return sharding.replicate(x, self.mesh)
        return jax.tree.map(put, tree)

    @property
    def module(self) -> Qwen25VLModel:
        return nnx.merge(self.graphdef, self.params)

    def inputs(self, input_ids, attention_mask, pixel_values, image_grid_thw) -> tuple[QwenInputs, tuple | None]:
        """Host-side: the processor's arrays -> (QwenInputs, the batch's merged grid (Gh, Gw) or None if the images'
        grids differ). Errors name the array at fault."""
        try:
            inputs = prepare_inputs(self.config, input_ids, attention_mask, np.asarray(pixel_values, np.float32),
                                    image_grid_thw)
        except ValueError as e:
            raise InputError(str(e)) from None
        thw = np.asarray(image_grid_thw).reshape(-1, 3)
        if len(thw) != inputs.input_ids.shape[0]:
            raise InputError(f"image_grid_thw gives {len(thw)} images for {inputs.input_ids.shape[0]} prompts: give "
                             f"one image per prompt")
        m = self.config.vision.spatial_merge_size
        grids = {(int(h) // m, int(w) // m) for _, h, w in thw}
        return self._replicated(inputs), grids.pop() if len(grids) == 1 else None

    def __call__(self, *, input_ids, attention_mask, pixel_values, image_grid_thw, blink=None, tokensr=None,
                 rng=None) -> ModelOutput:
        """Prefill logits [B, T, V] (left padded as the processor pads). `blink=BlinkConfig(...)` runs Blink
        (`out.trace`); `tokensr` and `rng` as for `Llava`."""
        inputs, grid = self.inputs(input_ids, attention_mask, pixel_values, image_grid_thw)
        b = self._blink_args(blink, tokensr, rng, grid)
        logits, trace = _qwen_prefill(self.graphdef, self.params, b.bank_def, b.bank_state, inputs, b.thresholds,
                                      b.key, static=b.static, grid=grid if blink is not None else None)
        return ModelOutput(logits=logits, trace=None if blink is None else runner.to_host(trace, blink.layers))

    def generate(self, *, input_ids, attention_mask, pixel_values, image_grid_thw, max_new_tokens: int = 16,
                 blink=None, tokensr=None, rng=None, eos_token_id: int | None = None, pad_token_id: int | None = None,
                 return_trace: bool = False):
        """Greedy decoding (transformers' `generate(do_sample=False)`). -> np.ndarray [B, max_new_tokens] int32,
        padded with `pad_token_id` after EOS (and Blink's trace with `return_trace=True`)."""
        inputs, grid = self.inputs(input_ids, attention_mask, pixel_values, image_grid_thw)
        text = self.config.text
        eos = text.eos_token_id if eos_token_id is None else eos_token_id
        pad = (text.pad_token_id if text.pad_token_id is not None else 0) if pad_token_id is None else pad_token_id
        b = self._blink_args(blink, tokensr, rng, grid)
        tokens, trace = _qwen_generate(self.graphdef, self.params, b.bank_def, b.bank_state, inputs, b.thresholds,
                                       b.key, static=b.static, grid=grid if blink is not None else None,
                                       max_new_tokens=max_new_tokens, eos_token_id=-1 if eos is None else eos,
                                       pad_token_id=pad)
        tokens = np.asarray(tokens)
        if not return_trace:
            return tokens
        return tokens, None if blink is None else runner.to_host(trace, blink.layers)

    def _blink_args(self, blink, tokensr, rng, grid) -> runner.BlinkArgs:
        if blink is None:
            return runner.BlinkArgs(None, None, None, None, None)
        if grid is None:
            raise InputError("Blink needs one visual grid per batch but image_grid_thw differs across its images: "
                             "resize them to one grid shape (QwenProcessor with grid_shapes) and batch by shape")
        b = runner.prepare(blink, tokensr, rng, num_layers=self.config.text.num_hidden_layers, grid=grid,
                           dim=self.config.text.hidden_size)
        return dataclasses.replace(b, bank_state=self._replicated(b.bank_state),
                                   thresholds=self._replicated(b.thresholds), key=self._replicated(b.key))
