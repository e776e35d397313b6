"""AdamW with linear warm-up + cosine decay and global-norm clipping, for the TokenSR parameters only.

The backbone never enters the optimiser: the train step differentiates a function of the TokenSR parameters
alone (the frozen backbone's outputs arrive as inputs), so the backbone has no gradient and no optimiser
state, which is what maxtext's `multi_transform`/`set_to_zero` achieves when frozen weights share the
parameter tree. Weight decay applies to kernels, not biases.
"""

from __future__ import annotations

import dataclasses

import jax
import optax


@dataclasses.dataclass(frozen=True)
class OptimConfig:
    """Hashable, so that a compiled train step can be reused by every run in a process that uses the same one."""

    lr: float
    warmup_steps: int
    total_steps: int
    end_lr_ratio: float = 0.0
    clip_norm: float = 1.0
    weight_decay: float = 0.01
    b1: float = 0.9
    b2: float = 0.999
    eps: float = 1e-8

    def schedule(self) -> optax.Schedule:
        """0 -> lr linearly over `warmup_steps`, then cosine to lr * end_lr_ratio at `total_steps`."""
        return optax.warmup_cosine_decay_schedule(
            init_value=0.0, peak_value=self.lr, warmup_steps=self.warmup_steps,
            decay_steps=max(self.total_steps, self.warmup_steps + 1), end_value=self.lr * self.end_lr_ratio)

    def optimizer(self) -> optax.GradientTransformation:
        parts = [optax.clip_by_global_norm(self.clip_norm)] if self.clip_norm > 0 else []
        parts.append(optax.adamw(self.schedule(), b1=self.b1, b2=self.b2, eps=self.eps,
                                 weight_decay=self.weight_decay, mask=decay_mask))
        return optax.chain(*parts)


def decay_mask(params):
    return jax.tree.map(lambda x: x.ndim > 1, params)
