"""A vanilla forward that stops after the deepest requested layer and reports, per requested layer, the
visual tokens' output hidden states and the saliency-guided scan of the last prompt token.

Used by TokenSR training (student inputs, teacher targets, region choice) and by threshold calibration.
Letters: B batch, T prompt length, D model dim, G grid side, V visual tokens (G*G).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import struct

from blink_jax.blink.forward import visual_layout
from blink_jax.blink.saliency import saliency_guided_scan
from blink_jax.model.forward import causal_mask, position_ids
from blink_jax.model.llava import LlavaModel


@struct.dataclass
class Probe:
    visual: jax.Array  # [Lp, B, G, G, D]: layer L's output hidden states of the visual grid (residual stream)
    rho: jax.Array  # [Lp, B]
    region: jax.Array  # [Lp, B] int32: r*
    attention: jax.Array  # [Lp, B, G, G]: S_v


def probe_layers(model: LlavaModel, input_ids: jax.Array, pixel_values: jax.Array, attention_mask: jax.Array, *,
                 layers: tuple[int, ...], region_size: int) -> Probe:
    """Runs layers 0..max(layers) of vanilla LLaVA. The saliency is that of the prompt's last token."""
    cfg = model.config
    grid = cfg.vision.grid
    b, t = input_ids.shape
    h = model.embed_multimodal(input_ids, pixel_values)
    valid = attention_mask > 0
    positions = position_ids(attention_mask)
    mask = causal_mask(jnp.broadcast_to(jnp.arange(t), (b, t)), valid)
    visual_index, _ = visual_layout(input_ids, attention_mask, cfg.image_token_index, cfg.num_image_tokens, grid)
    out = []
    for index, layer in enumerate(model.language_model.layers[: max(layers) + 1]):
        h, q, k, _ = layer(h, positions, mask)
        if index in layers:
            rho, region, s_v = saliency_guided_scan(q[:, t - 1], k, valid, visual_index, grid=grid,
                                                    region_size=region_size)
            visual = jnp.take_along_axis(h, visual_index[..., None], axis=1).reshape(b, grid, grid, -1)
            out.append((visual, rho, region, s_v.reshape(b, grid, grid)))
    stack = lambda i: jnp.stack([o[i] for o in out])
    return Probe(visual=stack(0), rho=stack(1), region=stack(2), attention=stack(3))
