"""The one decoder loop (`blink_jax.model.decoder.walk`): its hooks, and the scanned layers, against transformers
and the literal Blink reference."""

from __future__ import annotations

import numpy as np
import pytest
import torch

import tiny_llava as tl
from blink_jax import Llava
from blink_jax.blink import BlinkConfig
from blink_jax.model.decoder import walk
from test_blink_inference import assert_matches_reference
from test_model_parity import batch, from_hf, hf_logits


@pytest.fixture(scope="module")
def models():
    hf = tl.make_hf_model(seed=1, vision_image_size=84, text_num_hidden_layers=6)
    return hf, from_hf(hf)


def test_hooks_see_each_layers_output(models):
    """A hook that records the stream after its layer sees transformers' hidden states of that layer."""
    hf, ours = models
    ids, pixels, mask = batch(ours.config, (60, 47), seed=5)
    model = ours.module
    prompt = model.prompt(*map(np.asarray, (ids, pixels, mask)))
    record = lambda index, stream, q, k: (stream, np.asarray(stream.h))
    _, kv, seen = walk(model.decoder_layers, prompt.stream, hooks={1: record, 3: record}, stop=4)
    assert len(kv) == 4 and len(seen) == 2
    pos = np.where(mask > 0, np.cumsum(mask, 1) - 1, 0)
    with torch.no_grad():
        states = hf(input_ids=torch.tensor(ids), pixel_values=torch.tensor(pixels), attention_mask=torch.tensor(mask),
                    position_ids=torch.tensor(pos), output_hidden_states=True).hidden_states
    valid = mask > 0
    for layer, got in zip((1, 3), seen):  # hidden_states[i + 1] is layer i's output
        np.testing.assert_allclose(got[valid], states[layer + 1].numpy()[valid], atol=1e-4, rtol=0)


def test_hook_outside_the_walk_is_refused(models):
    _, ours = models
    model = ours.module
    ids, pixels, mask = batch(ours.config, (60,), seed=5)
    prompt = model.prompt(*map(np.asarray, (ids, pixels, mask)))
    with pytest.raises(ValueError, match=r"hooks at layers \[5\]"):
        walk(model.decoder_layers, prompt.stream, hooks={5: lambda i, s, q, k: (s, None)}, stop=3)


def test_scanned_layers_equal_transformers(models):
    hf, ours = models
    scanned = Llava(ours.module, scan_layers=True)
    ids, pixels, mask = batch(ours.config, (60, 47), seed=5)
    got = np.asarray(scanned(input_ids=ids, pixel_values=pixels, attention_mask=mask).logits)
    valid = mask > 0
    np.testing.assert_allclose(got[valid], hf_logits(hf, ids, pixels, mask)[valid], atol=1e-4, rtol=0)


@pytest.mark.parametrize("tau", [(0.0, 0.0), (2.0, 0.0)])
def test_blink_with_scanned_layers_equals_reference(models, tau):
    """Participating layers 2-3 of 6: layers 0-1 and 4-5 (the latter carrying the SR slots) run as scans."""
    hf, ours = models
    scanned = Llava(ours.module, scan_layers=True)
    ids, pixels, mask = batch(ours.config, (60,), seed=5)
    cfg = BlinkConfig(layers=(2, 3), region_size=3, tau_exp=tau[0], tau_drop=tau[1])
    assert_matches_reference(hf, scanned, ids, pixels, mask, cfg)
    tokens = scanned.generate(input_ids=ids, pixel_values=pixels, attention_mask=mask, blink=cfg, max_new_tokens=4)
    np.testing.assert_array_equal(tokens, ours.generate(input_ids=ids, pixel_values=pixels, attention_mask=mask,
                                                        blink=cfg, max_new_tokens=4))
