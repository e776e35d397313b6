"""Blink's buffered, jit-compiled inference against the literal reference in `blink_reference.py`."""

from __future__ import annotations

import dataclasses


import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

import tiny_llava as tl
from blink_jax.blink import BlinkConfig, TokenSRBank
from blink_jax import runtime
from blink_reference import reference_blink, threshold_cases
from test_model_parity import batch, from_hf

LAYERS = (1, 2, 3, 4)


@pytest.fixture(scope="module")
def cases(models):
    """Threshold pairs covering every decision, on the single example `batch(cfg, (60,), seed=5)`."""
    _, ours = models
    return decision_cases(ours, *batch(ours.config, (60,), seed=5))


@pytest.fixture(scope="module")
def models():
    # 84px images -> a 6x6 grid; region_size 3 -> 4 regions; scale 2 -> 36 SR tokens.
    hf = tl.make_hf_model(seed=1, vision_image_size=84, text_num_hidden_layers=6)
    return hf, from_hf(hf)


def blink_cfg(**kw) -> BlinkConfig:
    return BlinkConfig(**{"layers": LAYERS, "region_size": 3, **kw})


def random_conv_bank(dim: int, seed: int = 0) -> TokenSRBank:
    """A conv TokenSR whose last conv is not zero, so it differs from interp."""
    bank = TokenSRBank(blink_cfg(tokensr_kind="conv", tokensr_channels=7), dim, rngs=nnx.Rngs(seed))
    for i, layer in enumerate(LAYERS):
        conv3 = bank[layer].conv3
        key = jax.random.key(100 + i)
        conv3.kernel[...] = 0.05 * jax.random.normal(key, conv3.kernel.shape)
        conv3.bias[...] = 0.05 * jax.random.normal(jax.random.fold_in(key, 1), conv3.bias.shape)
    return bank


def conv_params(bank: TokenSRBank) -> dict:
    return {layer: [(bank[layer].conv1.kernel[...], bank[layer].conv1.bias[...]),
                    (bank[layer].conv2.kernel[...], bank[layer].conv2.bias[...]),
                    (bank[layer].conv3.kernel[...], bank[layer].conv3.bias[...])] for layer in LAYERS}


def decision_cases(ours, ids, pixels, mask):
    """Blink configs whose traces together expand, keep, drop, refocus and expand again after a drop."""
    run = lambda te, td: ours(input_ids=ids, pixel_values=pixels, attention_mask=mask,
                              blink=blink_cfg(tau_exp=float(te), tau_drop=float(td))).trace
    pairs = threshold_cases(run, {"expand", "keep", "drop", "refocus", "expand again"})
    return [blink_cfg(tau_exp=tau_exp, tau_drop=tau_drop) for tau_exp, tau_drop in pairs]


def random_mlp_bank(dim: int, seed: int = 0) -> TokenSRBank:
    """An mlp TokenSR whose last dense layer is not zero, so it differs from interp."""
    bank = TokenSRBank(blink_cfg(tokensr_kind="mlp", tokensr_channels=7), dim, rngs=nnx.Rngs(seed))
    for i, layer in enumerate(LAYERS):
        dense3 = bank[layer].dense3
        key = jax.random.key(200 + i)
        dense3.kernel[...] = 0.05 * jax.random.normal(key, dense3.kernel.shape)
        dense3.bias[...] = 0.05 * jax.random.normal(jax.random.fold_in(key, 1), dense3.bias.shape)
    return bank


def mlp_params(bank: TokenSRBank) -> dict:
    return {layer: [(getattr(bank[layer], f"dense{i}").kernel[...], getattr(bank[layer], f"dense{i}").bias[...])
                    for i in (1, 2, 3)] for layer in LAYERS}


def assert_matches_reference(hf, ours, ids, pixels, mask, cfg, tokensr=None, conv=None, mlp=None):
    out = ours(input_ids=ids, pixel_values=pixels, attention_mask=mask, blink=cfg, tokensr=tokensr)
    ref_logits, ref_trace, _ = reference_blink(hf, ids[0], pixels[0], cfg, conv, mlp_params=mlp)
    np.testing.assert_allclose(np.asarray(out.logits)[0], ref_logits, atol=1e-4, rtol=0)
    assert out.trace.actions() == [[t["action"]] for t in ref_trace]
    np.testing.assert_array_equal(out.trace.region[:, 0], [t["region"] for t in ref_trace])
    np.testing.assert_allclose(out.trace.rho[:, 0], [t["rho"] for t in ref_trace], atol=1e-5)


@pytest.mark.parametrize("kind", ["interp", "conv", "mlp"])
def test_buffered_blink_equals_literal_reference(models, cases, kind):
    hf, ours = models
    ids, pixels, mask = batch(ours.config, (60,), seed=5)
    dim = ours.config.text.hidden_size
    bank = {"conv": random_conv_bank, "mlp": random_mlp_bank}[kind](dim) if kind != "interp" else None
    for cfg in cases:
        if kind != "interp":
            cfg = BlinkConfig(**{**cfg.__dict__, "tokensr_kind": kind, "tokensr_channels": 7})
        assert_matches_reference(hf, ours, ids, pixels, mask, cfg, bank,
                                 conv_params(bank) if kind == "conv" else None,
                                 mlp_params(bank) if kind == "mlp" else None)


@pytest.mark.parametrize("variant", [dict(reexpand="hold"), dict(drop=False), dict(expansion="fixed")])
def test_policies_equal_reference(models, cases, variant):
    hf, ours = models
    ids, pixels, mask = batch(ours.config, (60,), seed=5)
    for cfg in cases:
        assert_matches_reference(hf, ours, ids, pixels, mask, BlinkConfig(**{**cfg.__dict__, **variant}))


def test_no_expansion_is_vanilla(models):
    _, ours = models
    ids, pixels, mask = batch(ours.config, (60, 55, 48), seed=7)
    vanilla = np.asarray(ours(input_ids=ids, pixel_values=pixels, attention_mask=mask).logits)
    out = ours(input_ids=ids, pixel_values=pixels, attention_mask=mask, blink=blink_cfg(tau_exp=1.01, tau_drop=0.1))
    assert set(sum(out.trace.actions(), [])) == {"none"}
    # Equal up to float summation order (the buffer adds masked slots, so XLA may tile matmuls differently).
    np.testing.assert_allclose(np.asarray(out.logits)[mask > 0], vanilla[mask > 0], atol=1e-5, rtol=0)


def test_batch_with_different_decisions_equals_each_alone(models):
    _, ours = models
    lengths = (60, 55, 48)
    ids, pixels, mask = batch(ours.config, lengths, seed=7)
    probe = ours(input_ids=ids, pixel_values=pixels, attention_mask=mask, blink=blink_cfg(tau_exp=2.0, tau_drop=0.0))
    cfg = blink_cfg(tau_exp=float(np.median(probe.trace.rho)), tau_drop=float(np.quantile(probe.trace.rho, 0.3)))
    together = ours(input_ids=ids, pixel_values=pixels, attention_mask=mask, blink=cfg)
    patterns = {tuple(together.trace.action[:, i]) for i in range(len(lengths))}
    assert len(patterns) > 1, "all examples took the same decisions: the test would prove little"
    for i, n in enumerate(lengths):
        # Alone = a batch of one; left padding to the common length keeps one compiled shape for the suite.
        alone = ours(input_ids=ids[i:i + 1], pixel_values=pixels[i:i + 1], attention_mask=mask[i:i + 1], blink=cfg)
        np.testing.assert_allclose(np.asarray(together.logits)[i, -n:], np.asarray(alone.logits)[0, -n:], atol=1e-5)
        np.testing.assert_array_equal(together.trace.action[:, i], alone.trace.action[:, 0])
        np.testing.assert_array_equal(together.trace.region[:, i], alone.trace.region[:, 0])


def test_thresholds_and_inputs_do_not_recompile(models):
    _, ours = models
    ids, pixels, mask = batch(ours.config, (60,), seed=5)
    run = lambda cfg, px: ours(input_ids=ids, pixel_values=px, attention_mask=mask, blink=cfg)
    run(blink_cfg(), pixels)
    before = runtime._prefill._cache_size()
    for k, (tau_exp, tau_drop) in enumerate([(0.2, 0.1), (0.26, 0.25), (0.9, 0.0), (2.0, 1.5)]):
        run(blink_cfg(tau_exp=tau_exp, tau_drop=tau_drop), pixels + k)
    assert runtime._prefill._cache_size() == before


def test_generation_after_blink_prefill_equals_reference(models, cases):
    hf, ours = models
    ids, pixels, mask = batch(ours.config, (60,), seed=5)
    for cfg in cases[:3]:
        tokens, trace = ours.generate(input_ids=ids, pixel_values=pixels, attention_mask=mask, blink=cfg,
                                      max_new_tokens=8, eos_token_id=-1, return_trace=True)
        _, ref_trace, ref_tokens = reference_blink(hf, ids[0], pixels[0], cfg, max_new_tokens=8)
        assert trace.actions() == [[t["action"]] for t in ref_trace]
        np.testing.assert_array_equal(tokens[0], ref_tokens)


def test_bad_blink_configs(models):
    _, ours = models
    ids, pixels, mask = batch(ours.config, (60,), seed=5)
    from blink_jax import ConfigError
    with pytest.raises(ConfigError, match="region_size=4 does not divide"):
        ours(input_ids=ids, pixel_values=pixels, attention_mask=mask, blink=blink_cfg(region_size=4))
    with pytest.raises(ConfigError, match="layer index 6"):
        ours(input_ids=ids, pixel_values=pixels, attention_mask=mask, blink=blink_cfg(layers=(2, 6)))
    with pytest.raises(ConfigError, match="layer index 6.*; and .*region_size=4 does not divide") as both:
        blink_cfg(layers=(2, 6), region_size=4).validate_for(ours.config.text.num_hidden_layers, ours.config.vision.grid)
    from blink_jax.blink.config import in_flag_terms
    assert in_flag_terms(str(both.value)).startswith("--layers (2, 6) has layer index 6")
    assert "--region-size 4 does not divide" in in_flag_terms(str(both.value))
    with pytest.raises(ConfigError, match="tau_drop"):
        blink_cfg(tau_exp=0.2, tau_drop=0.3)
    with pytest.raises(ValueError, match="needs trained TokenSR"):
        ours(input_ids=ids, pixel_values=pixels, attention_mask=mask, blink=blink_cfg(tokensr_kind="conv"))


def test_probe_reports_vanilla_saliency_and_hidden_states(models):
    """`probe_layers` (used by training and calibration) agrees with Blink's trace when nothing expands,
    and its visual hidden states with the literal reference's layer outputs."""
    import torch
    from blink_jax.blink.probe import probe_layers

    hf, ours = models
    ids, pixels, mask = batch(ours.config, (60, 55, 48), seed=7)
    cfg = blink_cfg(tau_exp=2.0, tau_drop=0.0)
    trace = ours(input_ids=ids, pixel_values=pixels, attention_mask=mask, blink=cfg).trace
    probe = jax.jit(lambda m, *a: probe_layers(m, *a, layers=LAYERS, region_size=3))(
        ours.module, jnp.asarray(ids), jnp.asarray(pixels), jnp.asarray(mask))
    np.testing.assert_allclose(np.asarray(probe.rho), trace.rho, atol=1e-6)
    np.testing.assert_array_equal(np.asarray(probe.region), trace.region)
    with torch.no_grad():
        pos = np.where(mask > 0, np.cumsum(mask, 1) - 1, 0)
        hs = hf(input_ids=torch.tensor(ids), pixel_values=torch.tensor(pixels), attention_mask=torch.tensor(mask),
                position_ids=torch.tensor(pos), output_hidden_states=True).hidden_states
    image = np.argwhere(ids[0] == ours.config.image_token_index)[:, 0]
    for j, layer in enumerate(LAYERS):
        expected = hs[layer + 1][0].numpy()[image].reshape(6, 6, -1)
        np.testing.assert_allclose(np.asarray(probe.visual[j, 0]), expected, atol=1e-4)


def test_tokensr_checkpoint_round_trip(models, tmp_path):
    from blink_jax.blink.checkpoint import load_tokensr, save_tokensr

    _, ours = models
    bank = random_conv_bank(ours.config.text.hidden_size)
    cfg = blink_cfg(tokensr_kind="conv", tokensr_channels=7, tau_exp=0.0, tau_drop=0.0)
    save_tokensr(tmp_path / "sr", bank, cfg, dim=ours.config.text.hidden_size)
    loaded, loaded_cfg = load_tokensr(tmp_path / "sr")
    assert loaded_cfg == cfg
    ids, pixels, mask = batch(ours.config, (60,), seed=5)
    run = lambda b: np.asarray(ours(input_ids=ids, pixel_values=pixels, attention_mask=mask, blink=cfg,
                                    tokensr=b).logits)
    np.testing.assert_array_equal(run(loaded), run(bank))
    with pytest.raises(FileNotFoundError, match="not a TokenSR checkpoint"):
        load_tokensr(tmp_path)
    # A bank used with a config of another geometry is named before anything is traced.
    for field, value in (("scale", 3), ("tokensr_channels", 9)):
        other = dataclasses.replace(cfg, **{field: value})
        with pytest.raises(ValueError, match=f"built with {field}=.* but BlinkConfig.{field}={value}"):
            ours(input_ids=ids, pixel_values=pixels, attention_mask=mask, blink=other, tokensr=loaded)
    # A trained mlp TokenSR goes through the same checkpoint and is refused under a conv config by name.
    mlp_bank = random_mlp_bank(ours.config.text.hidden_size)
    mlp_cfg = dataclasses.replace(cfg, tokensr_kind="mlp")
    save_tokensr(tmp_path / "mlp", mlp_bank, mlp_cfg, dim=ours.config.text.hidden_size)
    loaded_mlp, loaded_mlp_cfg = load_tokensr(tmp_path / "mlp")
    assert loaded_mlp_cfg == mlp_cfg
    run_mlp = lambda b: np.asarray(ours(input_ids=ids, pixel_values=pixels, attention_mask=mask, blink=mlp_cfg,
                                        tokensr=b).logits)
    np.testing.assert_array_equal(run_mlp(loaded_mlp), run_mlp(mlp_bank))
    with pytest.raises(ValueError, match="built with tokensr_kind='mlp' but BlinkConfig.tokensr_kind='conv'"):
        ours(input_ids=ids, pixel_values=pixels, attention_mask=mask, blink=cfg, tokensr=loaded_mlp)
    state = nnx.state(loaded)
    np.testing.assert_array_equal(run(state), run(bank))  # a bare state runs too ...
    with pytest.raises(ValueError, match="the TokenSR state does not fit"):  # ... and is shape-checked
        ours(input_ids=ids, pixel_values=pixels, attention_mask=mask, tokensr=state,
             blink=dataclasses.replace(cfg, tokensr_channels=9))
