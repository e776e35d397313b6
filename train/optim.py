"""AdamW with linear warm-up + cosine decay and global-norm clipping, for the TokenSR parameters only.

The backbone never enters the optimiser: the train step differentiates a function of the TokenSR parameters
alone (the frozen backbone's outputs arrive as inputs), so the backbone has no gradient and no optimiser
state, which is what maxtext's `multi_transform`/`set_to_zero` achieves when frozen weights share the
parameter tree. Weight decay applies to conv kernels, not biases.
"""

from __future__ import annotations

import jax
import optax


def make_schedule(lr: float, warmup_steps: int, total_steps: int, end_lr_ratio: float = 0.0) -> optax.Schedule:
    """0 -> lr linearly over `warmup_steps`, then cosine to lr * end_lr_ratio at `total_steps`."""
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0, peak_value=lr, warmup_steps=warmup_steps,
        decay_steps=max(total_steps, warmup_steps + 1), end_value=lr * end_lr_ratio)


def decay_mask(params):
    return jax.tree.map(lambda x: x.ndim > 1, params)


def make_optimizer(*, lr: float, warmup_steps: int, total_steps: int, end_lr_ratio: float = 0.0,
                   clip_norm: float = 1.0, weight_decay: float = 0.01, b1: float = 0.9, b2: float = 0.999,
                   eps: float = 1e-8) -> tuple[optax.GradientTransformation, optax.Schedule]:
    schedule = make_schedule(lr, warmup_steps, total_steps, end_lr_ratio)
    parts = [optax.clip_by_global_norm(clip_norm)] if clip_norm > 0 else []
    parts.append(optax.adamw(schedule, b1=b1, b2=b2, eps=eps, weight_decay=weight_decay, mask=decay_mask))
    return optax.chain(*parts), schedule
