"""The Blink mechanics (saliency, DTR, SR bookkeeping, TokenSR, config) against slow references.

Odd sizes on purpose: B=3 examples, N=6 query heads over K=3 kv heads, H=5, D=5, G=6 with r=3 or 2.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import torch.nn.functional as F
from flax import nnx

from blink_jax.blink import (
    DROP,
    EXPAND,
    KEEP,
    NO_REGION,
    NONE,
    BlinkConfig,
    TokenSR,
    TokenSRBank,
    action_names,
    decide,
    gather_region,
    gather_visual,
    init_state,
    last_token_attention,
    random_regions,
    region_box,
    region_scores,
    saliency_guided_scan,
    saliency_ratio,
    select_on_expand,
    sr_position_ids,
    step,
    visual_saliency,
)
from blink_jax.blink.config import BlinkStatic, parse_layers
from blink_jax.blink.tokensr import check_geometry, check_state
from blink_jax.config import ConfigError

B, N, K, H, D, G = 3, 6, 3, 5, 5, 6


def rng(seed=0):
    return np.random.default_rng(seed)


# --------------------------------------------------------------------------- saliency


def test_last_token_attention_matches_per_head_loop():
    r = rng(1)
    S = 11
    q = r.normal(size=(B, N, H)).astype(np.float32)
    k = r.normal(size=(B, S, K, H)).astype(np.float32)
    valid = np.ones((B, S), bool)
    valid[0, :2] = False  # left padding
    valid[1, 9:] = False  # unfilled capacity
    valid[2, [0, 4, 7]] = False
    got = np.asarray(last_token_attention(jnp.asarray(q), jnp.asarray(k), jnp.asarray(valid)))

    want = np.zeros((B, N, S))
    for b in range(B):
        for n in range(N):
            kv = n // (N // K)
            logits = np.array([q[b, n] @ k[b, s, kv] / np.sqrt(H) for s in range(S)], np.float64)
            e = np.where(valid[b], np.exp(logits - logits[valid[b]].max()), 0.0)
            want[b, n] = e / e.sum()
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
    assert np.all(got[~np.broadcast_to(valid[:, None], got.shape)] == 0.0)

    none_valid = last_token_attention(jnp.asarray(q), jnp.asarray(k), jnp.zeros((B, S), bool))
    assert np.all(np.asarray(none_valid) == 0.0)


def test_visual_saliency_gathers_per_example_offsets():
    r = rng(2)
    S, V = 16, 9
    probs = r.random((B, N, S)).astype(np.float32)
    offsets = [1, 4, 6]
    vis = np.stack([o + np.arange(V) for o in offsets]).astype(np.int32)
    got = np.asarray(visual_saliency(jnp.asarray(probs), jnp.asarray(vis)))
    want = np.zeros((B, V))
    for b in range(B):
        for v in range(V):
            want[b, v] = np.mean([probs[b, n, offsets[b] + v] for n in range(N)])
    np.testing.assert_allclose(got, want, rtol=1e-6)


@pytest.mark.parametrize("r", [3, 2])
def test_region_scores_and_ratio_match_loops(r):
    s_v = rng(3).random((B, G * G)).astype(np.float32)
    got = np.asarray(region_scores(jnp.asarray(s_v), G, r))
    R = (G // r) ** 2
    want = np.zeros((B, R))
    for b in range(B):
        for i in range(G):
            for j in range(G):
                want[b, (i // r) * (G // r) + (j // r)] += s_v[b, i * G + j]
    np.testing.assert_allclose(got, want, rtol=1e-6)

    rho, region = saliency_ratio(jnp.asarray(want, jnp.float32))
    np.testing.assert_allclose(np.asarray(rho), [max(w) / sum(w) for w in want], rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(region), [int(np.argmax(w)) for w in want])
    assert region.dtype == jnp.int32

    rho0, _ = saliency_ratio(jnp.zeros((2, R)))
    np.testing.assert_array_equal(np.asarray(rho0), 0.0)


def test_saliency_guided_scan_under_jit():
    r = rng(4)
    S, V = 12, 4  # a 2x2 grid, one region of 2x2 -> rho 1, or r=1 -> 4 regions
    q = jnp.asarray(r.normal(size=(B, N, H)), jnp.float32)
    k = jnp.asarray(r.normal(size=(B, S, K, H)), jnp.float32)
    valid = jnp.ones((B, S), bool)
    vis = jnp.asarray(np.stack([o + np.arange(V) for o in (0, 2, 5)]), jnp.int32)
    scan = jax.jit(saliency_guided_scan, static_argnames=("grid", "region_size"))
    rho, region, s_v = scan(q, k, valid, vis, grid=2, region_size=1)
    p = np.asarray(last_token_attention(q, k, valid)).mean(1)
    s_v_ref = np.stack([p[b, np.asarray(vis[b])] for b in range(B)])
    np.testing.assert_allclose(np.asarray(s_v), s_v_ref, rtol=1e-5)
    np.testing.assert_allclose(np.asarray(rho), s_v_ref.max(1) / s_v_ref.sum(1), rtol=1e-5)
    np.testing.assert_array_equal(np.asarray(region), s_v_ref.argmax(1))


# --------------------------------------------------------------------------- DTR

TE, TD = 0.30, 0.15
# (policy, rho, r*, expanded, current region) -> (action, expanded after, region after)
DECIDE_TABLE = {
    ("refocus", True, False): [
        ((0.50, 4, False, NO_REGION), (EXPAND, True, 4)),
        ((0.20, 4, False, NO_REGION), (NONE, False, NO_REGION)),
        ((0.10, 4, False, NO_REGION), (NONE, False, NO_REGION)),
        ((0.30, 4, False, NO_REGION), (NONE, False, NO_REGION)),  # strict >
        ((0.50, 7, True, 2), (EXPAND, True, 7)),  # refocus
        ((0.50, 2, True, 2), (EXPAND, True, 2)),  # refocus on the same region refreshes it
        ((0.20, 7, True, 2), (KEEP, True, 2)),
        ((0.15, 7, True, 2), (KEEP, True, 2)),  # strict <
        ((0.10, 7, True, 2), (DROP, False, NO_REGION)),
    ],
    ("hold", True, False): [
        ((0.50, 7, True, 2), (KEEP, True, 2)),
        ((0.50, 7, False, NO_REGION), (EXPAND, True, 7)),
        ((0.20, 7, True, 2), (KEEP, True, 2)),
        ((0.10, 7, True, 2), (DROP, False, NO_REGION)),
        ((0.10, 7, False, NO_REGION), (NONE, False, NO_REGION)),
    ],
    ("refocus", False, False): [  # w/o Drop
        ((0.10, 7, True, 2), (KEEP, True, 2)),
        ((0.10, 7, False, NO_REGION), (NONE, False, NO_REGION)),
        ((0.50, 5, True, 2), (EXPAND, True, 5)),
    ],
    ("hold", True, True): [  # fixed: always expand at r*
        ((0.10, 3, False, NO_REGION), (EXPAND, True, 3)),
        ((0.10, 6, True, 3), (EXPAND, True, 6)),
        ((0.20, 1, False, NO_REGION), (EXPAND, True, 1)),
        ((0.90, 0, True, 5), (EXPAND, True, 0)),
    ],
}


@pytest.mark.parametrize("policy", list(DECIDE_TABLE))
def test_decide_table(policy):
    reexpand, drop, fixed = policy
    cases = DECIDE_TABLE[policy]
    rho, rs, exp, cur = (jnp.asarray([c[0][i] for c in cases]) for i in range(4))
    action, new_exp, new_region = jax.jit(decide, static_argnames=("drop", "reexpand", "fixed"))(
        rho.astype(jnp.float32), rs, exp, cur, jnp.float32(TE), jnp.float32(TD),
        drop=drop, reexpand=reexpand, fixed=fixed,
    )
    got = list(zip(np.asarray(action).tolist(), np.asarray(new_exp).tolist(), np.asarray(new_region).tolist()))
    assert got == [c[1] for c in cases]
    np.testing.assert_array_equal(np.isin(np.asarray(action), [EXPAND, KEEP]), np.asarray(new_exp))  # SR tokens stay


def test_decide_compiles_once_across_thresholds():
    traces = []

    def fn(rho, rs, exp, cur, te, td):
        traces.append(1)
        return decide(rho, rs, exp, cur, te, td, drop=True, reexpand="refocus", fixed=False)

    jitted = jax.jit(fn)
    rho = jnp.asarray([0.2, 0.4, 0.6], jnp.float32)
    rs = jnp.asarray([1, 2, 3], jnp.int32)
    exp = jnp.asarray([False, True, False])
    cur = jnp.asarray([NO_REGION, 0, NO_REGION], jnp.int32)
    actions = [np.asarray(jitted(rho, rs, exp, cur, jnp.float32(te), jnp.float32(0.1))[0]).tolist()
               for te in (0.1, 0.5, 1.5)]
    assert actions == [[EXPAND] * 3, [NONE, KEEP, EXPAND], [NONE, KEEP, NONE]]
    assert len(traces) == 1

    # The config split: equal static parts for any thresholds, so `step` traces once too.
    traces.clear()

    def stepper(state, rho, rs, thresholds, static):
        traces.append(1)
        return step(state, rho, rs, thresholds, static)

    jstep = jax.jit(stepper, static_argnums=4)
    base = BlinkConfig(layers=(1, 2), region_size=3)
    outs = []
    for te, td in ((0.1, 0.05), (0.5, 0.3), (2.0, 0.3)):
        static, thr = dataclasses.replace(base, tau_exp=te, tau_drop=td).split()
        outs.append(np.asarray(jstep(init_state(3), rho, rs, thr, static)[0]).tolist())
    assert outs == [[EXPAND] * 3, [NONE, NONE, EXPAND], [NONE] * 3]
    assert len(traces) == 1


def test_decide_vmaps_and_per_example_thresholds():
    rho = jnp.asarray([[0.5, 0.1], [0.2, 0.4]], jnp.float32)
    rs = jnp.asarray([[1, 2], [3, 0]], jnp.int32)
    exp = jnp.asarray([[False, True], [True, False]])
    cur = jnp.asarray([[NO_REGION, 2], [1, NO_REGION]], jnp.int32)
    f = lambda r, s, e, c, te: decide(r, s, e, c, te, jnp.float32(0.15), drop=True, reexpand="refocus", fixed=False)
    act = jax.jit(jax.vmap(f, in_axes=(0, 0, 0, 0, None)))(rho, rs, exp, cur, jnp.float32(0.3))[0]
    assert np.asarray(act).tolist() == [[EXPAND, DROP], [KEEP, EXPAND]]
    per_example = jax.jit(f)(rho[1], rs[1], exp[1], cur[1], jnp.asarray([0.1, 0.45], jnp.float32))[0]
    assert np.asarray(per_example).tolist() == [EXPAND, NONE]
    assert action_names(act) == [["expand", "drop"], ["keep", "expand"]]


def test_random_regions_in_range():
    reg = random_regions(jax.random.key(0), 50, 4)
    assert reg.shape == (50,) and reg.dtype == jnp.int32
    assert set(np.asarray(reg).tolist()) == {0, 1, 2, 3}


@pytest.mark.parametrize("make_key", [jax.random.key, jax.random.PRNGKey], ids=["typed", "raw"])
def test_random_regions_per_example_keys_ignore_batch_company(make_key):
    keys = jnp.stack([jax.random.fold_in(make_key(0), i) for i in range(7)])
    together = np.asarray(random_regions(keys, 7, 5))
    alone = [int(random_regions(keys[i:i + 1], 1, 5)[0]) for i in range(7)]
    shuffled = np.asarray(random_regions(keys[::-1], 7, 5))[::-1]
    assert together.tolist() == alone == shuffled.tolist()
    with pytest.raises(ValueError, match="3 per-example keys for a batch of 7"):
        random_regions(keys[:3], 7, 5)


# --------------------------------------------------------------------------- SR bookkeeping


def region_cells(region, r):
    """Grid cells of a region, row-major, found by scanning the grid (not by formula inversion)."""
    return [(i, j) for i in range(G) for j in range(G) if (i // r) * (G // r) + (j // r) == region]


@pytest.mark.parametrize("r", [3, 2])
def test_gather_region_matches_loop(r):
    h = rng(5).normal(size=(B, G, G, D)).astype(np.float32)
    regions = np.array([0, (G // r) ** 2 - 1, G // r + 1], np.int32)  # first, last, an inner one
    got = np.asarray(gather_region(jnp.asarray(h), jnp.asarray(regions), r))
    for b in range(B):
        cells = region_cells(regions[b], r)
        want = np.stack([h[b, i, j] for i, j in cells]).reshape(r, r, D)
        np.testing.assert_array_equal(got[b], want)


def test_gather_visual_per_example_offsets():
    T, V = 45, G * G
    h = rng(6).normal(size=(B, T, D)).astype(np.float32)
    offsets = [0, 3, 9]
    vis = np.stack([o + np.arange(V) for o in offsets]).astype(np.int32)
    got = np.asarray(gather_visual(jnp.asarray(h), jnp.asarray(vis), G))
    for b in range(B):
        for i in range(G):
            for j in range(G):
                np.testing.assert_array_equal(got[b, i, j], h[b, offsets[b] + i * G + j])


@pytest.mark.parametrize("r,s", [(3, 2), (2, 3)])
def test_sr_position_ids_match_loop(r, s):
    pos = np.stack([rng(7 + b).permutation(100)[: G * G] for b in range(B)]).astype(np.int32)
    regions = np.array([1, 0, (G // r) ** 2 - 1], np.int32)
    got = np.asarray(sr_position_ids(jnp.asarray(pos), jnp.asarray(regions), G, r, s))
    assert got.shape == (B, (s * r) ** 2)
    for b in range(B):
        cells = region_cells(regions[b], r)
        row0, col0 = cells[0]
        want = [pos[b, (row0 + i // s) * G + col0 + j // s] for i in range(s * r) for j in range(s * r)]
        np.testing.assert_array_equal(got[b], want)


@pytest.mark.parametrize("r", [3, 2])
def test_region_box_covers_the_region_cells(r):
    patch = 7
    for region in range((G // r) ** 2):
        cells = region_cells(region, r)
        rows, cols = [i for i, _ in cells], [j for _, j in cells]
        want = (min(cols) * patch, min(rows) * patch, (max(cols) + 1) * patch, (max(rows) + 1) * patch)
        assert region_box(region, G, r, patch) == want


def test_select_on_expand():
    action = jnp.asarray([EXPAND, KEEP, DROP], jnp.int32)
    new, old = jnp.ones((B, 4, D)), jnp.zeros((B, 4, D))
    got = np.asarray(select_on_expand(action, new, old))
    np.testing.assert_array_equal(got[:, 0, 0], [1, 0, 0])
    np.testing.assert_array_equal(np.asarray(select_on_expand(action, jnp.ones((B, 4)), jnp.zeros((B, 4))))[:, 0], [1, 0, 0])


# --------------------------------------------------------------------------- TokenSR


def to_torch(x):  # NHWC -> NCHW
    return torch.from_numpy(np.array(x)).permute(0, 3, 1, 2)


@pytest.mark.parametrize("s", [2, 3])
def test_tokensr_interp_matches_torch(s):
    r = 3
    x = rng(8).normal(size=(B, r, r, D)).astype(np.float32)
    sr = TokenSR(D, region_size=r, scale=s, kind="interp", rngs=nnx.Rngs(0))
    got = np.asarray(sr(jnp.asarray(x)))
    want = F.interpolate(to_torch(x), scale_factor=s, mode="bilinear", align_corners=False)
    np.testing.assert_allclose(got, want.permute(0, 2, 3, 1).numpy(), rtol=1e-5, atol=1e-6)
    assert nnx.state(sr, nnx.Param) == nnx.State({})


def test_untrained_conv_tokensr_equals_interp():
    r, s = 3, 2
    x = jnp.asarray(rng(9).normal(size=(B, r, r, D)), jnp.float32)
    # C = D keeps this the file's only random init cheap (one kernel shape to compile for).
    sr = TokenSR(D, region_size=r, scale=s, kind="conv", channels=D, rngs=nnx.Rngs(0))
    interp = TokenSR(D, region_size=r, scale=s, kind="interp", rngs=nnx.Rngs(0))
    assert np.any(np.asarray(sr.conv1.kernel[...]) != 0)
    np.testing.assert_array_equal(np.asarray(sr(x)), np.asarray(interp(x)))


def test_tokensr_conv_matches_torch():
    r, s, C = 3, 2, 7
    x = jnp.asarray(rng(9).normal(size=(B, r, r, D)), jnp.float32)
    # Abstract init (no random kernels to compute): every parameter is set below.
    sr = nnx.eval_shape(lambda: TokenSR(D, region_size=r, scale=s, kind="conv", channels=C, rngs=nnx.Rngs(0)))
    g = rng(10)
    weights = []
    for conv, (cin, cout) in ((sr.conv1, (D, C)), (sr.conv2, (C, C)), (sr.conv3, (C, D))):
        kernel = g.normal(size=(3, 3, cin, cout)).astype(np.float32) * 0.3  # HWIO
        bias = g.normal(size=(cout,)).astype(np.float32)
        assert conv.kernel.shape == kernel.shape and conv.bias.shape == bias.shape
        conv.kernel.set_value(jnp.asarray(kernel))
        conv.bias.set_value(jnp.asarray(bias))
        weights.append((torch.from_numpy(kernel).permute(3, 2, 0, 1), torch.from_numpy(bias)))  # OIHW

    u = F.interpolate(to_torch(x), scale_factor=s, mode="bilinear", align_corners=False)
    f = F.relu(F.conv2d(u, *weights[0], padding=1))
    f = F.relu(F.conv2d(f, *weights[1], padding=1))
    want = (u + F.conv2d(f, *weights[2], padding=1)).permute(0, 2, 3, 1).numpy()
    np.testing.assert_allclose(np.asarray(sr(x)), want, rtol=1e-4, atol=1e-4)


def test_untrained_mlp_tokensr_equals_interp_and_trained_matches_torch():
    r, s, C = 3, 2, 7
    x = jnp.asarray(rng(9).normal(size=(B, r, r, D)), jnp.float32)
    sr = TokenSR(D, region_size=r, scale=s, kind="mlp", channels=C, rngs=nnx.Rngs(0))
    interp = TokenSR(D, region_size=r, scale=s, kind="interp", rngs=nnx.Rngs(0))
    assert np.any(np.asarray(sr.dense1.kernel[...]) != 0)
    np.testing.assert_array_equal(np.asarray(sr(x)), np.asarray(interp(x)))
    g = rng(11)
    weights = []
    for dense, (cin, cout) in ((sr.dense1, (D, C)), (sr.dense2, (C, C)), (sr.dense3, (C, D))):
        kernel = g.normal(size=(cin, cout)).astype(np.float32) * 0.3
        bias = g.normal(size=(cout,)).astype(np.float32)
        dense.kernel.set_value(jnp.asarray(kernel))
        dense.bias.set_value(jnp.asarray(bias))
        weights.append((torch.from_numpy(kernel), torch.from_numpy(bias)))
    u = F.interpolate(to_torch(x), scale_factor=s, mode="bilinear", align_corners=False).permute(0, 2, 3, 1)
    f = F.relu(u @ weights[0][0] + weights[0][1])  # the same dense layers on every token
    f = F.relu(f @ weights[1][0] + weights[1][1])
    want = (u + f @ weights[2][0] + weights[2][1]).numpy()
    np.testing.assert_allclose(np.asarray(sr(x)), want, rtol=1e-4, atol=1e-4)


def test_tokensr_bank_paths():
    cfg = BlinkConfig(layers=(2, 5), region_size=3, tokensr_kind="conv", tokensr_channels=4)
    bank = nnx.eval_shape(lambda: TokenSRBank(cfg, D, rngs=nnx.Rngs(0)))
    paths = {tuple(str(p) for p in path) for path, _ in nnx.to_flat_state(nnx.state(bank, nnx.Param))}
    assert paths == {(f"layer_{l}", c, w) for l in (2, 5) for c in ("conv1", "conv2", "conv3")
                     for w in ("kernel", "bias")}
    assert bank.for_layer(5) is bank[5] and bank[2].conv1.kernel.shape == (3, 3, D, 4)
    assert bank[5].conv3.kernel.shape == (3, 3, 4, D)
    with pytest.raises(KeyError, match="layer 3"):
        bank.for_layer(3)
    interp = TokenSRBank(dataclasses.replace(cfg, tokensr_kind="interp"), D, rngs=nnx.Rngs(0))
    assert nnx.state(interp, nnx.Param) == nnx.State({})
    assert interp[5](jnp.zeros((B, 3, 3, D))).shape == (B, 6, 6, D)


def test_tokensr_geometry_checks_name_the_mismatch():
    cfg = BlinkConfig(layers=(2, 5), region_size=3, tokensr_kind="conv", tokensr_channels=4)
    bank = nnx.eval_shape(lambda: TokenSRBank(cfg, D, rngs=nnx.Rngs(0)))
    check_geometry(cfg, D, bank)
    check_geometry(dataclasses.replace(cfg, tau_exp=0.9).static_part(), D, bank)  # thresholds play no part
    wrong = [
        (dict(layers=(2, 6)), D, r"cover layers \(2, 5\) but BlinkConfig.layers=\(2, 6\)"),
        ({}, D + 1, f"layer 2 was trained for hidden size {D} but this model's is {D + 1}"),
        (dict(region_size=2), D, "layer 2 was built with region_size=3 but BlinkConfig.region_size=2"),
        (dict(scale=3), D, "built with scale=2 but BlinkConfig.scale=3"),
        (dict(tokensr_kind="interp"), D, "built with tokensr_kind='conv' but BlinkConfig.tokensr_kind='interp'"),
        (dict(tokensr_channels=5), D, "built with tokensr_channels=4 but BlinkConfig.tokensr_channels=5"),
    ]
    for change, dim, message in wrong:
        with pytest.raises(ValueError, match=message):
            check_geometry(dataclasses.replace(cfg, **change), dim, bank)
    state = nnx.state(bank, nnx.Param)
    check_state(cfg, D, state)
    check_state(dataclasses.replace(cfg, scale=3), D, state)  # no shape depends on the scale
    for change, dim in ((dict(tokensr_channels=5), D), ({}, D + 1), (dict(layers=(2,)), D)):
        with pytest.raises(ValueError, match="the TokenSR state does not fit"):
            check_state(dataclasses.replace(cfg, **change), dim, state)


# --------------------------------------------------------------------------- config


def test_config_validation_names_the_field():
    with pytest.raises(ConfigError, match="region_size=4.*grid side 6"):
        BlinkConfig(layers=(1,), region_size=4).validate_for(num_layers=3, grid=6)
    with pytest.raises(ConfigError, match=r"layers=.*index 12.*3 layers"):
        BlinkConfig().validate_for(num_layers=3, grid=24)
    with pytest.raises(ConfigError, match="tau_drop=0.4"):
        BlinkConfig(tau_drop=0.4)
    with pytest.raises(ConfigError, match="reexpand='again'"):
        BlinkConfig(reexpand="again")
    with pytest.raises(ConfigError, match="layers=.*sorted and unique"):
        BlinkConfig(layers=(3, 2))
    with pytest.raises(ConfigError, match="tau_exp"):
        BlinkConfig(tau_exp=-0.1, tau_drop=0.0)
    BlinkConfig(tau_exp=1.5).validate_for(num_layers=32, grid=24)  # expansion disabled: allowed


def test_config_ablations_and_split():
    cfg = BlinkConfig(layers=[1, 2], region_size=3)
    assert cfg.layers == (1, 2) and cfg.sr_side == 6 and cfg.num_sr_tokens == 36 and cfg.num_regions(6) == 4
    assert cfg.ablation("random").region_choice == "random"
    assert cfg.ablation("fixed").static_part().fixed
    assert cfg.ablation("no-drop").drop is False
    assert cfg.ablation("high-tau").tau_exp == 0.45
    assert cfg.ablation("full") == cfg
    with pytest.raises(ConfigError, match="ablation 'nope'"):
        cfg.ablation("nope")
    static, thr = cfg.split()
    assert not hasattr(static, "tau_exp")
    assert hash(static) == hash(dataclasses.replace(cfg, tau_exp=0.9).static_part())
    assert float(thr.tau_exp) == pytest.approx(0.30) and thr.tau_drop.dtype == jnp.float32
    assert static.with_thresholds(0.3, 0.15) == cfg
    # The static part is BlinkConfig's fields less the thresholds: names, order and defaults.
    fields = lambda cls: [(f.name, f.default) for f in dataclasses.fields(cls)]
    assert fields(BlinkStatic) == [f for f in fields(BlinkConfig) if f[0] not in ("tau_exp", "tau_drop")]
    with pytest.raises(ConfigError, match="layers=.*sorted and unique"):
        BlinkStatic(layers=(3, 2))


def test_parse_layers():
    assert parse_layers("12-14") == (12, 13, 14) and parse_layers("1,3") == (1, 3)
    assert parse_layers(" 7, 1-3,2 ") == (1, 2, 3, 7)
    for bad in ("1-x", "-1", "1-2-3", "a"):
        with pytest.raises(ConfigError, match=f"--layers {bad!r} is not a list of layer indices"):
            parse_layers(bad)
    with pytest.raises(ConfigError, match="names no layer"):
        parse_layers(" , ")


# --------------------------------------------------------------------------------- per-size defaults


def _qwen_hub_config(hidden, layers, heads, kv_heads, intermediate, vocab, tied):
    """A Qwen2.5-VL config as the hub's config.json gives it (the fields that differ between sizes)."""
    from transformers import Qwen2_5_VLConfig

    from blink_jax.model.qwen2_5_vl.config import Qwen25VLConfig

    text = dict(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                num_key_value_heads=kv_heads, intermediate_size=intermediate, vocab_size=vocab, rms_norm_eps=1e-6,
                rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [16, 24, 24]})
    hf = Qwen2_5_VLConfig(text_config=text, vision_config=dict(out_hidden_size=hidden), tie_word_embeddings=tied)
    return Qwen25VLConfig.from_hf_config(hf)


def test_per_size_blink_defaults():
    """Qwen2.5-VL-3B / -7B get a contiguous quarter of their decoder (BLINK.md §10) centred where LLaVA-7B's
    12-18 of 32 sits, and r = 6, which divides every grid bucket of that region size; LLaVA-7B gets the paper's."""
    from blink_jax.config import LlavaConfig
    from blink_jax.model.qwen2_5_vl.config import Qwen25VLConfig
    from blink_jax.model.qwen2_5_vl.processing import ImageProcessorConfig, grid_buckets

    llava = BlinkConfig.for_model(LlavaConfig.llava_1_5_7b())
    assert (llava.layers, llava.region_size) == (tuple(range(12, 19)), 6) == (BlinkConfig().layers, 6)
    llava_centre = (12 + 18 + 1) / 2 / 32
    sizes = {"3b": (_qwen_hub_config(2048, 36, 16, 2, 11008, 151936, True), Qwen25VLConfig.qwen2_5_vl_3b(),
                    tuple(range(13, 22))),
             "7b": (_qwen_hub_config(3584, 28, 28, 4, 18944, 152064, False), Qwen25VLConfig.qwen2_5_vl_7b(),
                    tuple(range(10, 17)))}
    max_pixels = ImageProcessorConfig().max_pixels
    for name, (hub, preset_cfg, expected) in sizes.items():
        assert hub.text == preset_cfg.text, name  # the classmethod per size is the hub's model
        cfg = BlinkConfig.for_model(hub)
        n = hub.text.num_hidden_layers
        assert cfg.layers == expected, name
        assert cfg.layers == tuple(range(cfg.layers[0], cfg.layers[-1] + 1)) and len(cfg.layers) == n // 4, name
        assert abs((cfg.layers[0] + cfg.layers[-1] + 1) / 2 / n - llava_centre) < 0.5 / n, name
        assert cfg.region_size == 6 and cfg.tau_exp == BlinkConfig().tau_exp
        buckets = grid_buckets(max_pixels, 28, multiple=cfg.region_size)
        assert len(buckets) >= 3
        for grid in buckets:
            cfg.validate_for(n, grid)
    overridden = BlinkConfig.for_model(sizes["7b"][0], tau_exp=0.4, region_size=3)
    assert (overridden.layers, overridden.region_size, overridden.tau_exp) == (tuple(range(10, 17)), 3, 0.4)


def test_unknown_size_needs_explicit_layers_and_region():
    from blink_jax.config import LlavaConfig

    big = LlavaConfig.llava_1_5_13b()
    with pytest.raises(ConfigError, match=r"40 layers x 5120 wide \(known: llava-1\.5-7b \(32 layers x 4096\), "
                                          r"qwen2\.5-vl-7b .*give layers= and region_size="):
        BlinkConfig.for_model(big)
    with pytest.raises(ConfigError, match="give layers= and region_size="):
        BlinkConfig.for_model(big, layers=(20, 21))
    cfg = BlinkConfig.for_model(big, layers=(16, 17, 18, 19, 20, 21, 22), region_size=4)
    assert (cfg.layers, cfg.region_size) == ((16, 17, 18, 19, 20, 21, 22), 4)


def test_default_for_is_the_preset_or_the_papers_defaults_and_eval_run_starts_from_it(tmp_path):
    from blink_jax.config import LlavaConfig
    from eval.harness.modes import build_modes
    from eval.harness.runner import blink_defaults

    qwen_7b = _qwen_hub_config(3584, 28, 28, 4, 18944, 152064, False)
    assert BlinkConfig.default_for(qwen_7b).layers == tuple(range(10, 17))
    assert BlinkConfig.default_for(LlavaConfig.llava_1_5_13b()) == BlinkConfig()  # no preset: the paper's
    # eval.run reads it from the model directory's config.json; interp and crop start from it, flags on top
    from transformers import Qwen2_5_VLConfig

    text = dict(hidden_size=3584, num_hidden_layers=28, num_attention_heads=28, num_key_value_heads=4,
                intermediate_size=18944, vocab_size=152064, rms_norm_eps=1e-6,
                rope_parameters={"rope_type": "default", "rope_theta": 1e6, "mrope_section": [16, 24, 24]})
    Qwen2_5_VLConfig(text_config=text, vision_config=dict(out_hidden_size=3584)).save_pretrained(tmp_path)
    default = blink_defaults(str(tmp_path))
    assert (default.layers, default.region_size) == (tuple(range(10, 17)), 6)
    assert blink_defaults(str(tmp_path / "missing")) is None
    interp, crop = build_modes(["interp", "crop"], default=default)
    assert interp.blink.layers == tuple(range(10, 17)) and crop.crop.crop_layer == 13
    [flagged] = build_modes(["interp"], default=default, layers=(4, 5), region_size=3)
    assert (flagged.blink.layers, flagged.blink.region_size) == ((4, 5), 3)
    [plain] = build_modes(["interp"])
    assert plain.blink.layers == BlinkConfig().layers
