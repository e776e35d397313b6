"""Blocked attention (`ops.attention`): any query block size, with causal key skipping or without, gives plain
softmax attention; whole prefills (vanilla, Blink with SR slots) and greedy generation do not depend on it."""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import tiny_llava as tl
from blink_jax.blink import BlinkConfig, TokenSRBank
from blink_jax.blink.forward import blink_prefill, buffer_order
from blink_jax.model import forward, ops
from test_model_parity import batch, from_hf


def reference_attention(q, k, v, mask):
    """The obvious way, in float64: per head, softmax over visible keys."""
    b, t, n, h = q.shape
    g = n // k.shape[2]
    out = np.zeros((b, t, n, h))
    for i in range(b):
        for head in range(n):
            logits = q[i, :, head].astype(np.float64) @ k[i, :, head // g].T.astype(np.float64) / math.sqrt(h)
            if mask is not None:
                logits = np.where(mask[i], logits, -np.inf)
            p = np.exp(logits - logits.max(-1, keepdims=True))
            out[i, :, head] = (p / p.sum(-1, keepdims=True)) @ v[i, :, head // g]
    return out


@pytest.fixture
def small_blocks(monkeypatch):
    """Query blocks of 5 (causal) and 4 rows, so tiny sequences span several blocks."""
    monkeypatch.setattr(ops, "CPU_QUERY_BLOCK_CAUSAL", 5)
    monkeypatch.setattr(ops, "CPU_QUERY_BLOCK", 4)


@pytest.mark.parametrize("causal,tail", [(True, 0), (True, 7), (False, 0)])
@pytest.mark.parametrize("kv_heads", [3, 6])
def test_blocks_equal_reference(small_blocks, causal, tail, kv_heads):
    rng = np.random.default_rng(0)
    b, t, n, h = 2, 23, 6, 5
    q = rng.standard_normal((b, t, n, h)).astype(np.float32)
    k, v = (rng.standard_normal((b, t, kv_heads, h)).astype(np.float32) for _ in range(2))
    valid = np.ones((b, t), bool)
    valid[1, :4] = False  # left padding
    if causal:  # Blink's buffer: the prompt, then `tail` SR slots ranked right after the image (ends at 9 / 12)
        order = buffer_order(t - tail, tail, jnp.asarray([9, 12]))
        valid[0, t - tail:] = False  # example 0 has no SR tokens
    else:  # an order that is not the physical one
        order = jnp.asarray(rng.permutation(t))[None].repeat(b, 0)
    mask = np.asarray(forward.causal_mask(order, jnp.asarray(valid)))
    got = ops.attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), jnp.asarray(mask), causal=causal, tail=tail)
    np.testing.assert_allclose(np.asarray(got), reference_attention(q, k, v, mask), atol=1e-5, rtol=0)
    no_mask = ops.attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(v), None)
    np.testing.assert_allclose(np.asarray(no_mask), reference_attention(q, k, v, None), atol=1e-5, rtol=0)


def test_causal_needs_square_attention_and_tail_needs_causal():
    q = jnp.zeros((1, 1, 2, 4))
    with pytest.raises(ValueError, match="causal"):
        ops.attention(q, jnp.zeros((1, 3, 2, 4)), jnp.zeros((1, 3, 2, 4)), None, causal=True)
    with pytest.raises(ValueError, match="tail"):
        ops.attention(q, jnp.zeros((1, 1, 2, 4)), jnp.zeros((1, 1, 2, 4)), None, tail=1)


@pytest.fixture(scope="module")
def model():
    # 84 px images -> a 6x6 grid (36 image tokens); region 3, scale 2 -> 36 SR slots.
    return from_hf(tl.make_hf_model(seed=1, vision_image_size=84, text_num_hidden_layers=4))


def _outputs(llava, ids, px, mask):
    """Vanilla logits, Blink (expanding at every layer) logits and greedy tokens, through fresh jits so that
    the block sizes in force are the ones traced."""
    model = llava.module
    cfg = BlinkConfig(layers=(1, 2), region_size=3, expansion="fixed")
    static, thresholds = cfg.split()
    bank = TokenSRBank(static, model.config.text.hidden_size, rngs=nnx.Rngs(0))
    ids, px, mask = (jnp.asarray(x) for x in (ids, px, mask))
    vanilla, cache = jax.jit(forward.prefill, static_argnums=0)(model, ids, px, mask)
    tokens = jax.jit(functools.partial(forward.greedy_decode, max_new_tokens=3, eos_token_id=-1, pad_token_id=0),
                     static_argnums=0)(model, vanilla[:, -1], cache)
    blink, _, trace = jax.jit(blink_prefill, static_argnums=(0, 1, 5))(model, bank, ids, px, mask, static, thresholds,
                                                                        jax.random.key(0))
    assert (np.asarray(trace.action) != 0).all()  # the SR slots really are in use
    return np.asarray(vanilla), np.asarray(tokens), np.asarray(blink)


def test_prefill_and_generation_do_not_depend_on_blocks(model, monkeypatch):
    ids, px, mask = batch(model.config, (57, 44), seed=3)
    whole = _outputs(model, ids, px, mask)  # the default blocks cover the whole sequence here
    monkeypatch.setattr(ops, "CPU_QUERY_BLOCK_CAUSAL", 5)
    monkeypatch.setattr(ops, "CPU_QUERY_BLOCK", 4)
    blocked = _outputs(model, ids, px, mask)
    real = mask > 0
    np.testing.assert_allclose(blocked[0][real], whole[0][real], atol=1e-5, rtol=0)
    np.testing.assert_array_equal(blocked[1], whole[1])
    np.testing.assert_allclose(blocked[2][real], whole[2][real], atol=1e-5, rtol=0)
