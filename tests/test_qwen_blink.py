"""Blink on Qwen2.5-VL (BLINK.md §10): the buffered, jit-compiled `Qwen` runtime against a literal reference written
here on transformers' PyTorch `Qwen2_5_VLForConditionalGeneration`, on a tiny random model with a 4 x 6 visual grid
(non-square, so a swapped axis fails), plus the grid-shape buckets of the processor."""

from __future__ import annotations

import itertools
import math

import numpy as np
import pytest
import torch
from PIL import Image

from blink_jax.blink import BlinkConfig
from blink_jax.blink.dtr import region_box, sr_position_ids, sr_source_index
from blink_jax.blink.saliency import region_scores
from blink_jax.model.qwen2_5_vl import runtime as qwen_runtime
from blink_jax.model.qwen2_5_vl.loading import load_pretrained
from blink_jax.model.qwen2_5_vl.processing import (ImageProcessorConfig, grid_buckets, nearest_grid,
                                                   preprocess_images)
from blink_reference import decide, threshold_cases, tokensr_torch
from test_qwen2_5_vl import IMAGE_CFG, VOCAB, hf_processor, make_tokenizer
from tiny_llava import photo

LAYERS = (1, 2, 3)
GRID = (4, 6)  # merged cells of a 168 x 112 photo (smart resize keeps it): regions 2 x 3 with r = 2
SIZE = (168, 112)  # (width, height)
QUESTIONS = ["is there a cat in the image ?", "what colour is the circle ?",
             "how many red or green or blue circle left of the dog ?"]


def blink_cfg(**kw) -> BlinkConfig:
    return BlinkConfig(**{"layers": LAYERS, "region_size": 2, **kw})


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """(HF model, our `Qwen` runtime, HF processor, model dir): 5 decoder layers, GQA 5 query heads over 1 kv head."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration, Qwen2VLImageProcessor

    text = dict(hidden_size=60, intermediate_size=47, num_hidden_layers=5, num_attention_heads=5,
                num_key_value_heads=1, rope_parameters={"rope_type": "default", "rope_theta": 500.0,
                                                        "mrope_section": [2, 2, 2]},
                vocab_size=len(VOCAB) + 5, rms_norm_eps=1e-6, max_position_embeddings=512, bos_token_id=None,
                eos_token_id=VOCAB["<|im_end|>"], pad_token_id=VOCAB["<|endoftext|>"])
    vision = dict(depth=2, hidden_size=40, intermediate_size=37, num_heads=5, out_hidden_size=60, window_size=56,
                  fullatt_block_indexes=[1])
    cfg = Qwen2_5_VLConfig(text_config=text, vision_config=vision, image_token_id=VOCAB["<|image_pad|>"],
                           video_token_id=VOCAB["<|video_pad|>"], vision_start_token_id=VOCAB["<|vision_start|>"],
                           vision_end_token_id=VOCAB["<|vision_end|>"], tie_word_embeddings=False)
    cfg._attn_implementation = "eager"
    torch.manual_seed(3)
    hf = Qwen2_5_VLForConditionalGeneration(cfg).eval()
    gen = torch.Generator().manual_seed(4)
    with torch.no_grad():
        for name, p in hf.named_parameters():
            if name.endswith("bias") or "norm" in name or "ln_q" in name:
                p.add_(0.1 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(torch.randn(p.shape, generator=gen) * 0.3)
    path = tmp_path_factory.mktemp("qwen_blink")
    hf.save_pretrained(str(path))
    make_tokenizer(path)
    Qwen2VLImageProcessor(**IMAGE_CFG).save_pretrained(str(path))
    _, ours = load_pretrained(path)
    return hf, qwen_runtime.Qwen(ours), hf_processor(path), path


def hf_batch(proc, questions, seeds):
    images = [photo(*SIZE, seed=s) for s in seeds]
    texts = [proc.apply_chat_template([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": q}]}],
                                      add_generation_prompt=True, tokenize=False) for q in questions]
    return proc(text=texts, images=images, padding=True, padding_side="left", return_tensors="pt")


def arrays(batch) -> dict:
    return {k: batch[k].numpy() for k in ("input_ids", "attention_mask", "pixel_values", "image_grid_thw")}


# ------------------------------------------------------------------------------------------------ the reference
def _causal(n: int) -> torch.Tensor:
    return torch.triu(torch.full((n, n), float("-inf")), diagonal=1)[None, None]


def _layer_call(layer, rotary, x, pos):
    """One transformers decoder layer over a literal sequence x [n, D] with M-RoPE positions pos [3, n] (float).
    -> (output [n, D], the rotary (cos, sin))."""
    embeddings = rotary(x[None], pos[:, None, :])
    return layer(x[None], attention_mask=_causal(x.shape[0]), position_embeddings=embeddings)[0], embeddings


def _saliency(layer, x, embeddings, visual_idx):
    """Head-mean softmax attention of the last token on the visual tokens, from the layer's own q and k."""
    from transformers.models.qwen2_5_vl.modeling_qwen2_5_vl import apply_rotary_pos_emb, repeat_kv

    attn = layer.self_attn
    xn = layer.input_layernorm(x[None])
    n, hd = attn.num_heads, attn.head_dim
    q = attn.q_proj(xn).view(1, -1, n, hd).transpose(1, 2)
    k = attn.k_proj(xn).view(1, -1, attn.num_key_value_heads, hd).transpose(1, 2)
    q, k = apply_rotary_pos_emb(q, k, *embeddings)
    k = repeat_kv(k, attn.num_key_value_groups)
    probs = torch.softmax((q[:, :, -1:] @ k.transpose(-1, -2)) / math.sqrt(hd), dim=-1)[0, :, 0]  # [N, n]
    return probs[:, visual_idx].mean(0)


def reference_qwen_blink(hf, ids, pixels, thw, blink, max_new_tokens=0):
    """Blink the slow, obvious way on one unpadded example: SR tokens literally inserted after the image run when a
    layer expands and cut out when it drops; M-RoPE positions from transformers' `get_rope_index`, an SR token's
    that of its source token or (sr_positions="fractional") moved to its fine cell's centre.
    -> (logits [T, V] numpy, trace list of dicts, generated tokens)."""
    cfg = hf.config
    lm = hf.model.language_model
    m = cfg.vision_config.spatial_merge_size
    gh, gw = int(thw[1]) // m, int(thw[2]) // m
    r, s = blink.region_size, blink.scale
    per_row = gw // r
    with torch.no_grad():
        ids_t = torch.tensor(np.asarray(ids))[None]
        is_img = ids_t[0] == cfg.image_token_id
        emb = lm.embed_tokens(ids_t)
        thw_t = torch.tensor(np.asarray(thw))[None]
        emb[0, is_img] = hf.model.get_image_features(torch.tensor(np.asarray(pixels)), thw_t).pooler_output[0]
        pos, _ = hf.model.get_rope_index(ids_t, is_img[None].int(), image_grid_thw=thw_t)
        pos = pos[:, 0].double()  # [3, T]
        start = int(torch.nonzero(is_img)[0])
        visual_idx = list(range(start, start + gh * gw))
        vis_end = visual_idx[-1]
        seq = emb[0]
        sr, sr_pos, expanded = None, None, False
        trace, contexts = [], []
        for index, layer in enumerate(lm.layers):
            if sr is not None:
                x = torch.cat([seq[:vis_end + 1], sr, seq[vis_end + 1:]])
                p = torch.cat([pos[:, :vis_end + 1], sr_pos, pos[:, vis_end + 1:]], dim=1)
            else:
                x, p = seq, pos
            contexts.append((x.clone(), p.clone()))
            out, embeddings = _layer_call(layer, lm.rotary_emb, x, p)
            s_v = _saliency(layer, x, embeddings, visual_idx)
            if sr is not None:
                n_sr = sr.shape[0]
                seq, sr = torch.cat([out[:vis_end + 1], out[vis_end + 1 + n_sr:]]), out[vis_end + 1:vis_end + 1 + n_sr]
            else:
                seq = out
            if index not in blink.layers:
                continue
            action, rho, r_star = decide(s_v.reshape(gh // r, r, gw // r, r).sum((1, 3)).reshape(-1), blink, expanded)
            if action == "expand":
                expanded = True
                r0, c0 = (r_star // per_row) * r, (r_star % per_row) * r
                grid_h = seq[visual_idx].reshape(gh, gw, -1)
                up = tokensr_torch(grid_h[r0:r0 + r, c0:c0 + r], s, None)
                sr = up.reshape(-1, up.shape[-1])
                cols = []
                for i in range(s * r):
                    for j in range(s * r):
                        t_, h_, w_ = pos[:, visual_idx[(r0 + i // s) * gw + c0 + j // s]].tolist()
                        if blink.sr_positions == "fractional":
                            h_ += (i % s + 0.5) / s - 0.5
                            w_ += (j % s + 0.5) / s - 0.5
                        cols.append([t_, h_, w_])
                sr_pos = torch.tensor(cols, dtype=torch.float64).T
            elif action == "drop":
                expanded, sr, sr_pos = False, None, None
            trace.append(dict(layer=index, rho=rho, region=r_star, action=action))
        logits = hf.lm_head(lm.norm(seq))

        generated = []
        next_pos, last = float(pos.max()) + 1, logits[-1]
        for _ in range(max_new_tokens):
            token = int(last.argmax())
            generated.append(token)
            h = lm.embed_tokens(torch.tensor([[token]]))[0]
            for index, layer in enumerate(lm.layers):
                x, p = contexts[index]
                x, p = torch.cat([x, h]), torch.cat([p, torch.full((3, 1), next_pos, dtype=p.dtype)], dim=1)
                contexts[index] = (x, p)
                h = _layer_call(layer, lm.rotary_emb, x, p)[0][-1:]
            last = hf.lm_head(lm.norm(h))[-1]
            next_pos += 1
    return logits.numpy(), trace, generated


# ------------------------------------------------------------------------------------------------ cases
@pytest.fixture(scope="module")
def cases(models):
    """Threshold pairs whose traces on example 0 together expand, keep, drop and refocus (as in the LLaVA test:
    candidates just above and below every rho seen, a second round with the rhos the first round's SR tokens made)."""
    _, ours, proc, _ = models
    x = arrays(hf_batch(proc, QUESTIONS[:1], [0]))
    run = lambda te, td: ours(**x, blink=blink_cfg(tau_exp=float(te), tau_drop=float(td))).trace
    return threshold_cases(run, {"expand", "keep", "drop", "refocus"})


# ------------------------------------------------------------------------------------------------ tests
def test_no_expansion_is_vanilla(models):
    _, ours, proc, _ = models
    x = arrays(hf_batch(proc, QUESTIONS[:2], [0, 1]))
    assert (x["attention_mask"] == 0).any(), "the batch must be left padded"
    vanilla = np.asarray(ours(**x).logits)
    out = ours(**x, blink=blink_cfg(tau_exp=1.01, tau_drop=0.1))
    assert set(sum(out.trace.actions(), [])) == {"none"}
    valid = x["attention_mask"] > 0
    np.testing.assert_allclose(np.asarray(out.logits)[valid], vanilla[valid], atol=1e-5, rtol=0)


@pytest.mark.parametrize("sr_positions", ["source", "fractional"])
def test_blink_equals_literal_reference(models, cases, sr_positions):
    hf, ours, proc, _ = models
    x = arrays(hf_batch(proc, QUESTIONS[:1], [0]))
    assert tuple(x["image_grid_thw"][0, 1:] // 2) == GRID
    for tau_exp, tau_drop in cases:
        cfg = blink_cfg(tau_exp=tau_exp, tau_drop=tau_drop, sr_positions=sr_positions)
        out = ours(**x, blink=cfg)
        ref_logits, ref_trace, _ = reference_qwen_blink(hf, x["input_ids"][0], x["pixel_values"],
                                                        x["image_grid_thw"][0], cfg)
        assert out.trace.actions() == [[t["action"]] for t in ref_trace]
        np.testing.assert_array_equal(out.trace.region[:, 0], [t["region"] for t in ref_trace])
        np.testing.assert_allclose(out.trace.rho[:, 0], [t["rho"] for t in ref_trace], atol=1e-5)
        np.testing.assert_allclose(np.asarray(out.logits)[0], ref_logits, atol=1e-4, rtol=0)


def test_generation_after_blink_equals_reference(models, cases):
    """Decoding continues at transformers' next M-RoPE position over a cache that holds SR tokens."""
    hf, ours, proc, _ = models
    x = arrays(hf_batch(proc, QUESTIONS[:1], [0]))
    traces = [(ours(**x, blink=blink_cfg(tau_exp=te, tau_drop=td)).trace, te, td) for te, td in cases]
    ending_expanded = [(te, td) for trace, te, td in traces if trace.actions()[-1][0] in ("expand", "keep")]
    assert ending_expanded, "no case leaves SR tokens in the cache: generation would not test them"
    cfg = blink_cfg(tau_exp=ending_expanded[0][0], tau_drop=ending_expanded[0][1], sr_positions="fractional")
    tokens = ours.generate(**x, blink=cfg, max_new_tokens=5, eos_token_id=-1)
    _, _, expected = reference_qwen_blink(hf, x["input_ids"][0], x["pixel_values"], x["image_grid_thw"][0], cfg,
                                          max_new_tokens=5)
    assert tokens[0].tolist() == expected
    assert len(set(expected)) > 1, "degenerate continuation: the test would prove little"


def test_fractional_positions_change_the_numbers(models, cases):
    """The two SR position modes differ wherever SR tokens are in the sequence (else the reference test above would
    not tell them apart)."""
    _, ours, proc, _ = models
    x = arrays(hf_batch(proc, QUESTIONS[:1], [0]))
    tau_exp, tau_drop = cases[0]
    source = ours(**x, blink=blink_cfg(tau_exp=tau_exp, tau_drop=tau_drop))
    fractional = ours(**x, blink=blink_cfg(tau_exp=tau_exp, tau_drop=tau_drop, sr_positions="fractional"))
    assert "expand" in sum(source.trace.actions(), [])
    assert np.abs(np.asarray(source.logits) - np.asarray(fractional.logits)).max() > 1e-4


def test_batch_of_different_decisions_equals_each_alone(models, cases):
    _, ours, proc, _ = models
    x = arrays(hf_batch(proc, QUESTIONS, [0, 1, 2]))
    for tau_exp, tau_drop in cases:
        cfg = blink_cfg(tau_exp=tau_exp, tau_drop=tau_drop)
        out = ours(**x, blink=cfg)
        if len({tuple(a) for a in np.asarray(out.trace.action).T.tolist()}) > 1:
            break
    else:
        raise AssertionError("no case makes the examples of the batch decide differently")
    per_image = int(np.prod(x["image_grid_thw"][0]))
    valid = x["attention_mask"] > 0
    for i in range(3):
        alone = {"input_ids": x["input_ids"][i:i + 1, valid[i]],
                 "attention_mask": x["attention_mask"][i:i + 1, valid[i]],
                 "pixel_values": x["pixel_values"][i * per_image:(i + 1) * per_image],
                 "image_grid_thw": x["image_grid_thw"][i:i + 1]}
        one = ours(**alone, blink=cfg)
        assert one.trace.actions() == [[a[i]] for a in out.trace.actions()]
        np.testing.assert_array_equal(one.trace.region[:, 0], out.trace.region[:, i])
        # Equal up to float summation order (other matmul shapes in the vision tower and the padded decoder).
        np.testing.assert_allclose(np.asarray(one.logits)[0], np.asarray(out.logits)[i, valid[i]], atol=1e-4, rtol=0)


def test_thresholds_do_not_recompile(models, cases):
    _, ours, proc, _ = models
    x = arrays(hf_batch(proc, QUESTIONS[:1], [0]))
    ours(**x, blink=blink_cfg(tau_exp=0.9, tau_drop=0.1))
    before = qwen_runtime._qwen_prefill._cache_size()
    for tau_exp, tau_drop in cases:
        ours(**x, blink=blink_cfg(tau_exp=tau_exp, tau_drop=tau_drop))
    assert qwen_runtime._qwen_prefill._cache_size() == before


def test_blink_refuses_a_batch_of_mixed_grids(models):
    _, ours, proc, _ = models
    images = [photo(*SIZE, seed=0), photo(112, 168, seed=1)]
    texts = [proc.apply_chat_template([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": q}]}],
                                      add_generation_prompt=True, tokenize=False) for q in QUESTIONS[:2]]
    x = arrays(proc(text=texts, images=images, padding=True, padding_side="left", return_tensors="pt"))
    ours(**x)  # vanilla runs mixed grids
    with pytest.raises(ValueError, match="one visual grid per batch"):
        ours(**x, blink=blink_cfg())


# ------------------------------------------------------------------------------------------------ Gh x Gw mechanics
def test_rectangular_grid_mechanics_match_loops():
    gh, gw, r, s = 4, 6, 2, 2
    rng = np.random.default_rng(0)
    s_v = rng.random((2, gh * gw)).astype(np.float32)
    want = np.zeros((2, (gh // r) * (gw // r)), np.float32)
    for b, i, j in itertools.product(range(2), range(gh), range(gw)):
        want[b, (i // r) * (gw // r) + j // r] += s_v[b, i * gw + j]
    np.testing.assert_allclose(np.asarray(region_scores(s_v, (gh, gw), r)), want, rtol=1e-6)
    regions = np.array([1, 5])
    idx = np.asarray(sr_source_index(regions, (gh, gw), r, s))
    pos = rng.integers(0, 100, (3, 2, gh * gw)).astype(np.int32)
    got = np.asarray(sr_position_ids(pos, regions, (gh, gw), r, s, "fractional"))
    for b in range(2):
        row0, col0 = (regions[b] // (gw // r)) * r, (regions[b] % (gw // r)) * r
        for i, j in itertools.product(range(s * r), range(s * r)):
            src = (row0 + i // s) * gw + col0 + j // s
            assert idx[b, i * s * r + j] == src
            t, h, w = pos[:, b, src]
            assert tuple(got[:, b, i * s * r + j]) == (t, h + (i % s + 0.5) / s - 0.5, w + (j % s + 0.5) / s - 0.5)
    assert region_box(5, (gh, gw), r, 28) == (112, 56, 168, 112)
    with pytest.raises(ValueError, match="M-RoPE"):
        sr_position_ids(pos[0], regions, (gh, gw), r, s, "fractional")


def test_validate_for_takes_a_rectangular_grid():
    from blink_jax.config import ConfigError

    blink_cfg().validate_for(5, (4, 6))
    assert blink_cfg().num_regions((4, 6)) == 6
    with pytest.raises(ConfigError, match=r"both sides of the visual grid 4 x 6; use a common divisor: \[1, 2\]"):
        blink_cfg(region_size=3).validate_for(5, (4, 6))


# ------------------------------------------------------------------------------------------------ grid buckets
def test_grid_buckets_fit_and_keep_the_aspect_ratio():
    max_pixels, factor = 28 * 28 * 1280, 28
    for multiple in (1, 2, 6):
        shapes = grid_buckets(max_pixels, factor, multiple=multiple)
        assert len(shapes) >= 5
        for gh, gw in shapes:
            assert gh * gw * factor * factor <= max_pixels and gh % multiple == 0 and gw % multiple == 0
            assert gh * gw * factor * factor > max_pixels / 2, "a bucket wastes half the pixel budget"
    shapes = grid_buckets(max_pixels, factor, multiple=2)
    assert nearest_grid(480, 640, shapes) == (30, 40) and nearest_grid(640, 480, shapes) == (40, 30)
    assert nearest_grid(500, 500, shapes) == (34, 34) and nearest_grid(100, 1000, shapes) == (24, 48)


def test_bucketed_preprocessing_equals_transformers_on_the_resized_image():
    """With grid shapes, an image is resized (PIL bicubic) to its bucket and then processed exactly as transformers
    processes an image already of that size (smart resize keeps a size that fits)."""
    from transformers import Qwen2VLImageProcessor

    shapes = ((4, 6), (6, 4), (5, 5))
    cfg = ImageProcessorConfig(**IMAGE_CFG, grid_shapes=shapes)
    images = [photo(200, 120, seed=0), photo(90, 170, seed=1), photo(130, 120, seed=2)]
    pixels, thw = preprocess_images(images, cfg)
    np.testing.assert_array_equal(thw, [[1, 8, 12], [1, 12, 8], [1, 10, 10]])
    resized = [img.convert("RGB").resize((gw * 28, gh * 28), Image.Resampling.BICUBIC)
               for img, (gh, gw) in zip(images, [(4, 6), (6, 4), (5, 5)])]
    expected = Qwen2VLImageProcessor(**IMAGE_CFG)(images=resized, return_tensors="np")
    np.testing.assert_array_equal(thw, expected["image_grid_thw"])
    np.testing.assert_allclose(pixels, expected["pixel_values"], atol=1e-6, rtol=0)


def test_processor_with_grid_shapes_batches_one_grid(models):
    """`QwenProcessor(grid_shapes=...)`: `grid_of` groups images by shape, a group's batch shares one grid, and Blink
    runs on it."""
    from blink_jax.model.qwen2_5_vl import QwenProcessor

    _, ours, _, path = models
    shapes = grid_buckets(IMAGE_CFG["max_pixels"], 28, multiple=2)
    proc = QwenProcessor.from_pretrained(path, grid_shapes=shapes)
    images = [photo(300, 200, seed=0), photo(100, 190, seed=1), photo(310, 190, seed=2)]
    groups = {}
    for i, img in enumerate(images):
        groups.setdefault(proc.grid_of(img), []).append(i)
    assert sorted(groups.values()) == [[0, 2], [1]] and set(groups) <= set(shapes)
    for grid, members in groups.items():
        batch = proc([QUESTIONS[i] for i in members], [images[i] for i in members])
        np.testing.assert_array_equal(batch["image_grid_thw"], [[1, 2 * grid[0], 2 * grid[1]]] * len(members))
    out = ours(**batch, blink=blink_cfg(tau_exp=0.0, tau_drop=0.0))  # the last group's batch
    assert out.logits.shape[:2] == batch["input_ids"].shape and "expand" in out.trace.actions()[0]
