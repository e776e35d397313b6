"""The Flax LLaVA port against transformers' PyTorch `LlavaForConditionalGeneration`, on tiny random models."""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np
import pytest
import torch

import tiny_llava as tl
from blink_jax import InputError, LlavaConfig, Llava
from blink_jax.weights.param_mapping import build_mapping, canonical_key
from blink_jax.weights.params import model_from_params, param_shapes

CONFIGS = {
    # GQA (3 kv heads of 6), odd widths, default strategy, second-to-last vision layer.
    "gqa": dict(),
    # CLS kept, another vision layer, tied embeddings, biases in attention and MLP, MHA.
    "full": dict(vision_feature_select_strategy="full", vision_feature_layer=-1, text_num_key_value_heads=6,
                 text_tie_word_embeddings=True, tie_word_embeddings=True, text_attention_bias=True,
                 text_mlp_bias=True, projector_hidden_act="gelu_pytorch_tanh"),
    # Features concatenated from two vision layers (transformers' list form).
    "multi_layer": dict(vision_feature_layer=[-3, -2], text_num_key_value_heads=2),
}


def from_hf(hf_model) -> Llava:
    """Our model with the HF model's weights, through the declarative key map."""
    cfg = LlavaConfig.from_hf_config(hf_model.config)
    sd = {canonical_key(k): v.detach().numpy() for k, v in hf_model.state_dict().items()}
    shapes = param_shapes(cfg)
    params = {e.path: e.transform.to_ours(sd[e.hf_key], shapes[e.path]) for e in build_mapping(cfg)}
    return Llava(model_from_params(cfg, params))


def batch(cfg: LlavaConfig, lengths=(29, 21), seed=0):
    """Two prompts of different lengths, left padded, each with one run of image tokens."""
    rng = np.random.default_rng(seed)
    p, t = cfg.num_image_tokens, max(lengths)
    ids = np.full((len(lengths), t), 3, np.int64)
    mask = np.zeros((len(lengths), t), np.int64)
    for row, n in enumerate(lengths):
        start = t - n
        ids[row, start:] = rng.integers(5, cfg.text.vocab_size, n)
        ids[row, start] = 1
        ids[row, start + 2 + row: start + 2 + row + p] = cfg.image_token_index
        mask[row, start:] = 1
    pixels = tl.random_pixels(len(lengths), cfg.vision.image_size, seed)
    return ids, pixels, mask


def hf_logits(hf_model, ids, pixels, mask):
    pos = np.where(mask > 0, np.cumsum(mask, 1) - 1, 0)
    with torch.no_grad():
        return hf_model(input_ids=torch.tensor(ids), pixel_values=torch.tensor(pixels),
                        attention_mask=torch.tensor(mask), position_ids=torch.tensor(pos)).logits.numpy()


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_logits_equal_transformers(name):
    hf = tl.make_hf_model(seed=1, **CONFIGS[name])
    ours = from_hf(hf)
    lengths = (16 + ours.config.num_image_tokens, 9 + ours.config.num_image_tokens)
    ids, pixels, mask = batch(ours.config, lengths)
    expected = hf_logits(hf, ids, pixels, mask)
    got = np.asarray(ours(input_ids=ids, pixel_values=pixels, attention_mask=mask).logits)
    valid = mask > 0
    np.testing.assert_allclose(got[valid], expected[valid], atol=1e-4, rtol=0)
    # The padded example alone gives the same logits as inside the batch.
    alone = np.asarray(ours(input_ids=ids[1:, -lengths[1]:], pixel_values=pixels[1:],
                            attention_mask=mask[1:, -lengths[1]:]).logits)
    np.testing.assert_allclose(alone[0], got[1, -lengths[1]:], atol=1e-5, rtol=0)


def test_config_from_hub_style_json(tmp_path):
    """A config.json as llava-hf ships it (sparse text config, rope_theta at top level) parses with defaults."""
    import json
    (tmp_path / "config.json").write_text(json.dumps({
        "architectures": ["LlavaForConditionalGeneration"], "model_type": "llava", "image_token_index": 32000,
        "projector_hidden_act": "gelu", "vision_feature_layer": -2, "vision_feature_select_strategy": "default",
        "text_config": {"model_type": "llama", "vocab_size": 32064, "rms_norm_eps": 1e-05,
                        "max_position_embeddings": 4096, "torch_dtype": "float16"},
        "vision_config": {"model_type": "clip_vision_model", "hidden_size": 1024, "image_size": 336,
                          "intermediate_size": 4096, "num_attention_heads": 16, "num_hidden_layers": 24,
                          "patch_size": 14, "projection_dim": 768, "vocab_size": 32000}}))
    cfg = LlavaConfig.from_json(tmp_path)
    assert cfg == LlavaConfig.llava_1_5_7b()
    assert cfg.num_image_tokens == 576 and cfg.vision.grid == 24


def test_not_llava_config(tmp_path):
    import json
    from blink_jax import ConfigError
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "llama", "hidden_size": 8}))
    with pytest.raises(ConfigError, match="model_type is 'llama'"):
        LlavaConfig.from_json(tmp_path)


def hf_generate(hf_model, ids, pixels, mask, n):
    with torch.no_grad():
        out = hf_model.generate(input_ids=torch.tensor(ids), pixel_values=torch.tensor(pixels),
                                attention_mask=torch.tensor(mask), max_new_tokens=n, min_new_tokens=n,
                                do_sample=False)
    return out[:, ids.shape[1]:].numpy()


def test_greedy_generation_equals_transformers():
    hf = tl.make_hf_model(seed=2, weight_scale=0.15)  # large enough weights for a non-repeating continuation
    hf.generation_config.pad_token_id = 3
    ours = from_hf(hf)
    ids, pixels, mask = batch(ours.config, (31, 24), seed=3)
    expected = hf_generate(hf, ids, pixels, mask, 16)
    got = ours.generate(input_ids=ids, pixel_values=pixels, attention_mask=mask, max_new_tokens=16,
                        eos_token_id=-1)
    np.testing.assert_array_equal(got, expected)
    assert len(set(expected.ravel().tolist())) > 6, "degenerate continuation: the test would prove little"


def test_generation_stops_at_eos_and_pads():
    hf = tl.make_hf_model(seed=2)
    ours = from_hf(hf)
    ids, pixels, mask = batch(ours.config, (31, 24), seed=3)
    free = ours.generate(input_ids=ids, pixel_values=pixels, attention_mask=mask, max_new_tokens=8,
                         eos_token_id=-1)
    eos = int(free[0, 2])  # pretend the third token of example 0 is EOS
    got = ours.generate(input_ids=ids, pixel_values=pixels, attention_mask=mask, max_new_tokens=8,
                        eos_token_id=eos, pad_token_id=0)
    first = int(np.argmax(free[0] == eos))
    np.testing.assert_array_equal(got[0, :first + 1], free[0, :first + 1])
    assert (got[0, first + 1:] == 0).all()


def test_bad_inputs_name_the_problem():
    hf = tl.make_hf_model(seed=0)
    ours = from_hf(hf)
    ids, pixels, mask = batch(ours.config)
    no_image = np.where(ids == ours.config.image_token_index, 7, ids)
    with pytest.raises(InputError, match="row 0 holds 0 image tokens"):
        ours(input_ids=no_image, pixel_values=pixels, attention_mask=mask)
    with pytest.raises(InputError, match="pixel_values has shape"):
        ours(input_ids=ids, pixel_values=pixels[:, :, :20], attention_mask=mask)
    with pytest.raises(InputError, match="pad on the left"):
        ours(input_ids=ids, pixel_values=pixels, attention_mask=mask[:, ::-1])
    with pytest.raises(InputError, match="pixel_values has shape"):  # device arrays are checked too
        ours(input_ids=ids, pixel_values=jnp.asarray(pixels)[:, :, :20], attention_mask=mask)


def test_device_pixels_give_the_same_logits():
    ours = from_hf(tl.make_hf_model(seed=0))
    ids, pixels, mask = batch(ours.config)
    host = ours(input_ids=ids, pixel_values=pixels, attention_mask=mask).logits
    device = ours(input_ids=ids, pixel_values=jnp.asarray(pixels, jnp.bfloat16).astype(jnp.float32),
                  attention_mask=mask).logits
    np.testing.assert_allclose(np.asarray(device), np.asarray(
        ours(input_ids=ids, pixel_values=np.asarray(jnp.asarray(pixels, jnp.bfloat16), np.float32),
             attention_mask=mask).logits), rtol=0, atol=0)
    assert not np.array_equal(np.asarray(host), np.asarray(device))  # the bf16 rounding reached the logits


def test_models_of_one_config_share_compiled_programs():
    from blink_jax import runtime

    a, b = from_hf(tl.make_hf_model(seed=0)), from_hf(tl.make_hf_model(seed=5))
    ids, pixels, mask = batch(a.config)
    la = np.asarray(a(input_ids=ids, pixel_values=pixels, attention_mask=mask).logits)
    size = runtime._prefill._cache_size()
    lb = np.asarray(b(input_ids=ids, pixel_values=pixels, attention_mask=mask).logits)
    assert runtime._prefill._cache_size() == size
    assert not np.allclose(la, lb)
