"""Blink written the slow, obvious way on transformers' PyTorch LLaVA, for the tests.

One example at a time, no padding, dynamic shapes: SR tokens are literally inserted into the
sequence after the visual tokens when a layer expands and cut out when it drops. Decisions are
Python `if`s on Python floats. Decoding re-runs each layer over its whole literal context.
"""

from __future__ import annotations

import itertools
import math

import numpy as np
import torch
import torch.nn.functional as F
from transformers.models.llama.modeling_llama import apply_rotary_pos_emb, repeat_kv


def tokensr_torch(x: torch.Tensor, scale: int, conv: list[tuple[np.ndarray, np.ndarray]] | None,
                  mlp: list[tuple[np.ndarray, np.ndarray]] | None = None) -> torch.Tensor:
    """x [r, r, D] -> [s r, s r, D]; `conv` = [(kernel HWIO, bias)] * 3 from our bank, `mlp` = [(kernel [in, out],
    bias)] * 3 (a dense residual applied to each token), or neither for interp."""
    u = F.interpolate(x.permute(2, 0, 1)[None], scale_factor=scale, mode="bilinear", align_corners=False)
    if mlp is not None:
        f = u[0].permute(1, 2, 0)  # [s r, s r, D]
        for i, (kernel, bias) in enumerate(mlp):
            f = f @ torch.tensor(np.asarray(kernel)) + torch.tensor(np.asarray(bias))
            f = F.relu(f) if i < 2 else f
        return u[0].permute(1, 2, 0) + f
    if conv is not None:
        f = u
        for i, (kernel, bias) in enumerate(conv):
            f = F.conv2d(f, torch.tensor(np.asarray(kernel)).permute(3, 2, 0, 1), torch.tensor(np.asarray(bias)),
                         padding=1)
            f = F.relu(f) if i < 2 else f
        u = u + f
    return u[0].permute(1, 2, 0)


def _causal(n: int) -> torch.Tensor:
    return torch.triu(torch.full((n, n), float("-inf")), diagonal=1)[None, None]


def _saliency(layer, x, pos, rotary, visual_idx):
    """Head-mean softmax attention of the last token on the visual tokens, from the layer's own q and k."""
    attn = layer.self_attn
    xn = layer.input_layernorm(x)
    n_heads, hd = attn.config.num_attention_heads, attn.head_dim
    n_kv = attn.config.num_key_value_heads
    q = attn.q_proj(xn).view(1, -1, n_heads, hd).transpose(1, 2)
    k = attn.k_proj(xn).view(1, -1, n_kv, hd).transpose(1, 2)
    cos, sin = rotary(x, pos)
    q, k = apply_rotary_pos_emb(q, k, cos, sin)
    k = repeat_kv(k, n_heads // n_kv)
    probs = torch.softmax((q[:, :, -1:] @ k.transpose(-1, -2)) / math.sqrt(hd), dim=-1)[0, :, 0]  # [N, n]
    return probs[:, visual_idx].mean(0)


def decide(regions: np.ndarray, blink, expanded: bool) -> tuple[str, float, int]:
    """BLINK.md §2-3 written out for one layer: region sums -> (action, rho, r*)."""
    rho, r_star = float(regions.max() / regions.sum()), int(regions.argmax())
    if blink.expansion == "fixed" or (rho > blink.tau_exp and not (expanded and blink.reexpand == "hold")):
        action = "expand"
    elif expanded and rho < blink.tau_drop and blink.drop:
        action = "drop"
    else:
        action = "keep" if expanded else "none"
    return action, rho, r_star


def reference_blink(hf, ids, pixels, blink, conv_params=None, max_new_tokens=0, mlp_params=None):
    """-> (logits [T, V] numpy, trace list of dicts per participating layer, generated token list).

    hf: LlavaForConditionalGeneration (eager, fp32); ids [T] one example, no padding; pixels [3, H, W].
    blink: a BlinkConfig; conv_params: {layer: [(kernel, bias)] * 3} for tokensr_kind='conv', mlp_params likewise
    for 'mlp'.
    """
    cfg = hf.config
    lm = hf.model.language_model
    grid = cfg.vision_config.image_size // cfg.vision_config.patch_size
    r, s = blink.region_size, blink.scale
    per_row = grid // r
    n_img = int((np.asarray(ids) == cfg.image_token_id).sum())
    with torch.no_grad():
        ids_t = torch.tensor(np.asarray(ids))[None]
        emb = lm.embed_tokens(ids_t)
        feats = hf.model.get_image_features(torch.tensor(np.asarray(pixels))[None]).pooler_output[0]
        is_img = ids_t[0] == cfg.image_token_id
        emb[0, is_img] = feats.to(emb.dtype)
        start = int(torch.nonzero(is_img)[0])
        vis_end = start + n_img - 1
        visual_idx = list(range(start + n_img - grid * grid, start + n_img))  # grid tokens (not CLS)
        seq, pos = emb[0], list(range(len(ids)))
        sr, sr_pos, expanded = None, None, False
        trace, contexts = [], []
        for index, layer in enumerate(lm.layers):
            if sr is not None:
                x = torch.cat([seq[: vis_end + 1], sr, seq[vis_end + 1:]])
                p = pos[: vis_end + 1] + sr_pos + pos[vis_end + 1:]
            else:
                x, p = seq, list(pos)
            contexts.append((x.clone(), list(p)))
            x, p_t = x[None], torch.tensor(p)[None]
            s_v = _saliency(layer, x, p_t, lm.rotary_emb, visual_idx)
            out = layer(x, attention_mask=_causal(x.shape[1]), position_ids=p_t,
                        position_embeddings=lm.rotary_emb(x, p_t))[0]
            if sr is not None:
                n_sr = sr.shape[0]
                seq = torch.cat([out[: vis_end + 1], out[vis_end + 1 + n_sr:]])
                sr = out[vis_end + 1: vis_end + 1 + n_sr]
            else:
                seq = out
            if index not in blink.layers:
                continue
            action, rho, r_star = decide(s_v.reshape(per_row, r, per_row, r).sum((1, 3)).reshape(-1), blink, expanded)
            if action == "expand":
                expanded = True
                r0, c0 = (r_star // per_row) * r, (r_star % per_row) * r
                grid_h = seq[visual_idx].reshape(grid, grid, -1)
                up = tokensr_torch(grid_h[r0:r0 + r, c0:c0 + r], s, None if conv_params is None else conv_params[index],
                                   None if mlp_params is None else mlp_params[index])
                sr = up.reshape(-1, up.shape[-1])
                sr_pos = [pos[visual_idx[(r0 + i // s) * grid + c0 + j // s]] for i in range(s * r) for j in range(s * r)]
            elif action == "drop":
                expanded, sr, sr_pos = False, None, None
            trace.append(dict(layer=index, rho=rho, region=r_star, action=action))
        logits = hf.lm_head(lm.norm(seq))

        generated = []
        next_pos, last = len(ids), logits[-1]
        for _ in range(max_new_tokens):
            token = int(last.argmax())
            generated.append(token)
            h = lm.embed_tokens(torch.tensor([[token]]))[0]
            for index, layer in enumerate(lm.layers):
                x, p = contexts[index]
                x, p = torch.cat([x, h]), p + [next_pos]
                contexts[index] = (x, p)
                p_t = torch.tensor(p)[None]
                h = layer(x[None], attention_mask=_causal(x.shape[0]), position_ids=p_t,
                          position_embeddings=lm.rotary_emb(x[None], p_t))[0][-1:]
            last = hf.lm_head(lm.norm(h))[-1]
            next_pos += 1
    return logits.numpy(), trace, generated


def events_of(actions, regions) -> set[str]:
    """The DTR events of one example's trace: actions (names) and r* per participating layer."""
    events, was_dropped, region = set(), False, None
    for a, r in zip(actions, regions):
        if a == "expand":
            events.add("expand again" if was_dropped else ("refocus" if region is not None and r != region
                                                            else "expand"))
            region = r
        elif a == "drop":
            events.add("drop")
            was_dropped, region = True, None
        elif a == "keep":
            events.add("keep")
    return events


def threshold_cases(run, wanted: set[str]) -> list[tuple[float, float]]:
    """(tau_exp, tau_drop) pairs whose traces of example 0 (`run(tau_exp, tau_drop) -> HostTrace`) together show
    every event in `wanted`. Candidates sit just above and below every rho seen so far; a second round adds the
    rhos that the first round's decisions produced (SR tokens change the later layers' attention)."""
    rhos = set(run(2.0, 0.0).rho[:, 0]) | set(run(0.0, 0.0).rho[:, 0])
    chosen, seen, tried = [], set(), set()
    for _ in range(2):
        candidates = sorted({round(float(v) + d, 6) for v in rhos for d in (-1e-4, 1e-4)})
        for tau_exp, tau_drop in itertools.product(candidates, candidates):
            if tau_drop > tau_exp or (tau_exp, tau_drop) in tried:
                continue
            tried.add((tau_exp, tau_drop))
            trace = run(tau_exp, tau_drop)
            rhos |= set(trace.rho[:, 0])
            events = events_of([a[0] for a in trace.actions()], trace.region[:, 0])
            if events - seen:
                chosen.append((tau_exp, tau_drop))
                seen |= events
        if wanted <= seen:
            return chosen
    raise AssertionError(f"no thresholds produced {wanted - seen}: the test model needs other sizes")
