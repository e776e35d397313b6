"""A vanilla forward that stops after the deepest requested layer and reports, per requested layer, the
visual tokens' output hidden states and the saliency-guided scan of the last prompt token: the decoder's one
walk with `probe_hook` at the requested layers.

Used by TokenSR training (student inputs, teacher targets, region choice) and by threshold calibration.
Letters: B batch, T prompt length, D model dim, Gh x Gw the visual grid, V visual tokens (Gh*Gw).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from blink_jax.blink.forward import visual_grid
from blink_jax.blink.saliency import saliency_guided_scan
from blink_jax.model.backbone import Backbone, Prompt
from blink_jax.model.decoder import Hook, Stream, walk


@struct.dataclass
class Probe:
    visual: jax.Array  # [Lp, B, Gh, Gw, D]: layer L's output hidden states of the visual grid (residual stream)
    rho: jax.Array  # [Lp, B]
    region: jax.Array  # [Lp, B] int32: r*
    attention: jax.Array  # [Lp, B, Gh, Gw]: S_v


def probe_hook(prompt: Prompt, grid: tuple[int, int], region_size: int) -> Hook:
    """Records, after its layer, the visual grid's hidden states and the last prompt token's saliency scan;
    leaves the stream as it is."""
    b, t = prompt.stream.valid.shape

    def hook(index: int, stream: Stream, q: jax.Array, k: jax.Array):
        rho, region, s_v = saliency_guided_scan(q[:, t - 1], k, stream.valid, prompt.visual_index, grid=grid,
                                                region_size=region_size)
        visual = jnp.take_along_axis(stream.h, prompt.visual_index[..., None], axis=1).reshape(b, *grid, -1)
        return stream, (visual, rho, region, s_v.reshape(b, *grid))

    return hook


def probe_layers(model: Backbone, input_ids: jax.Array, pixel_values: jax.Array, attention_mask: jax.Array, *,
                 layers: tuple[int, ...], region_size: int, **inputs) -> Probe:
    """Runs layers 0..max(layers) of the vanilla model. The saliency is that of the prompt's last token.
    `inputs`: what the backbone's `prompt` takes besides the three arrays (Qwen2.5-VL: layout, positions, grid)."""
    prompt = model.prompt(input_ids, pixel_values, attention_mask, **inputs)
    hook = probe_hook(prompt, visual_grid(prompt), region_size)
    _, _, records = walk(model.decoder_layers, prompt.stream, hooks={layer: hook for layer in layers},
                         stop=max(layers) + 1)
    stack = lambda i: jnp.stack([record[i] for record in records])
    return Probe(visual=stack(0), rho=stack(1), region=stack(2), attention=stack(3))
