"""The TokenSR distillation loss (BLINK.md §5): KL(softmax(teacher / T) || softmax(student / T)) over the hidden
dimension, averaged over SR tokens, examples and layers, plus an optional `mse_weight` x MSE.

Letters: Lp participating layers, B batch, O = s r SR grid side, D model dim.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp


def distill_loss(student: jax.Array, teacher: jax.Array, *, temperature: float = 1.0,
                 mse_weight: float = 0.0) -> tuple[jax.Array, dict]:
    """student, teacher: [Lp, B, O, O, D] -> (scalar loss, {"kl", "mse", "kl_per_layer" [Lp], "mse_per_layer" [Lp]})."""
    if student.shape != teacher.shape:
        raise ValueError(f"student output {student.shape} and teacher target {teacher.shape} differ in shape")
    s = student.astype(jnp.float32)
    t = teacher.astype(jnp.float32)
    log_q = jax.nn.log_softmax(s / temperature, axis=-1)
    log_p = jax.nn.log_softmax(t / temperature, axis=-1)
    kl = jnp.sum(jnp.exp(log_p) * (log_p - log_q), axis=-1)  # [Lp, B, O, O]
    kl_per_layer = kl.mean(axis=(1, 2, 3))
    mse_per_layer = jnp.square(s - t).mean(axis=(1, 2, 3, 4))
    kl_mean, mse_mean = kl_per_layer.mean(), mse_per_layer.mean()
    loss = kl_mean + mse_weight * mse_mean
    return loss, {"kl": kl_mean, "mse": mse_mean, "kl_per_layer": kl_per_layer, "mse_per_layer": mse_per_layer}
