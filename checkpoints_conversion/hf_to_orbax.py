"""Convert a Hugging Face LLaVA-1.5 or Qwen2.5-VL directory into this project's orbax directory (see `orbax_io`).

    python -m checkpoints_conversion.hf_to_orbax --hf-dir llava-1.5-7b-hf --out llava-7b-jax --verify
    python -m checkpoints_conversion.hf_to_orbax --hf-dir Qwen2.5-VL-7B-Instruct --out qwen-7b-jax --verify

The model family comes from config.json's `model_type` (`blink_jax.families`); config, tokenizer, processor
and chat template files travel with the weights, so the converted directory loads and preprocesses alone.

Everything is validated (config, key set, shapes, file headers, output directory) before anything is
written; tensors are then streamed one at a time, and the output appears atomically at the end.
"""

from __future__ import annotations

import argparse
import importlib.util
import os
import sys
from pathlib import Path

import numpy as np

from blink_jax.config import ConfigError, LlavaConfig
from blink_jax.families import QWEN2_5_VL, family_of
from blink_jax.hub import ModelNotFoundError, resolve_model_dir
from blink_jax.loading import load_pretrained
from blink_jax.model.qwen2_5_vl.config import Qwen25VLConfig
from blink_jax.weights import hf_reader, orbax_io
from blink_jax.weights.hf_reader import TORCH_HINT
from blink_jax.weights.params import CheckpointError

DTYPES = ("float32", "bfloat16", "float16")
# Largest |logit difference| accepted by --verify. Both models run in fp32 with identical weights (HF's
# are rounded to the converted dtype too), so only op-order differences remain; the bf16/fp16 defaults
# leave extra margin because such checkpoints are usually large models with larger logits.
DEFAULT_TOLERANCE = {"float32": 1e-3, "float16": 1e-2, "bfloat16": 2e-2}


def convert(hf_dir: str | os.PathLike, out_dir: str | os.PathLike, dtype: str | None = None, *,
            overwrite: bool = False, progress: bool = True) -> Path:
    """HF directory -> converted directory. `dtype`: None keeps the stored dtype(s). -> the output path."""
    if Path(out_dir).resolve() == Path(hf_dir).resolve():
        raise FileExistsError(f"--out '{out_dir}' is the HF directory itself: choose another output directory")
    family = family_of(hf_dir)
    cfg = family.config(hf_dir)
    steps = hf_reader.plan(hf_dir, cfg, family)
    orbax_io.check_out_dir(out_dir, overwrite)
    params = hf_reader.iter_plan(steps, dtype)
    if progress:
        from tqdm import tqdm
        params = _counted(params, tqdm(total=len(steps), unit="tensor", desc=f"converting {Path(hf_dir).name}"))
    return orbax_io.write_converted(out_dir, hf_dir, params, dtype, overwrite=overwrite, family=family)


def _counted(items, bar):
    """Yields `items`, updating the progress bar. Unlike `tqdm(items)`, it keeps no reference to the last item
    while the next one is read, so two large tensors are never held at once."""
    try:
        iterator = iter(items)
        while True:
            try:
                yield next(iterator)
            except StopIteration:
                return
            bar.update()
    finally:
        bar.close()


# ------------------------------------------------------------------------------------------------ verify


def sample_inputs(cfg: LlavaConfig, batch: int = 2, text_len: int = 7, seed: int = 0):
    """Random pixels and prompts `[bos, <image> x P, random words]`. -> (input_ids, pixel_values, mask)."""
    rng = np.random.default_rng(seed)
    t = cfg.text
    words = np.setdiff1d(np.arange(3, t.vocab_size), [cfg.image_token_index])
    text = rng.choice(words, size=(batch, text_len))
    image = np.full((batch, cfg.num_image_tokens), cfg.image_token_index)
    bos = np.full((batch, 1), t.bos_token_id if t.bos_token_id is not None else 1)
    input_ids = np.concatenate([bos, image, text], axis=1).astype(np.int64)
    size = cfg.vision.image_size
    pixels = rng.standard_normal((batch, cfg.vision.num_channels, size, size)).astype(np.float32)
    return input_ids, pixels, np.ones_like(input_ids)


def qwen_sample_inputs(cfg: Qwen25VLConfig, batch: int = 2, text_len: int = 7, seed: int = 0) -> dict:
    """Qwen2.5-VL's `sample_inputs`: random patches of one image per prompt (a 2 x 3 merged grid) and prompts
    `[<|vision_start|>, <|image_pad|> x 6, <|vision_end|>, random words]`, as the processor's arrays."""
    rng = np.random.default_rng(seed)
    m, v = cfg.vision.spatial_merge_size, cfg.vision
    grid = np.array([[1, 2 * m, 3 * m]] * batch, np.int64)  # (t, h, w) in patches
    specials = [cfg.image_token_id, cfg.video_token_id, cfg.vision_start_token_id, cfg.vision_end_token_id]
    words = np.setdiff1d(np.arange(cfg.text.vocab_size), specials)
    image = np.concatenate([[cfg.vision_start_token_id], [cfg.image_token_id] * 6, [cfg.vision_end_token_id]])
    input_ids = np.concatenate([np.tile(image, (batch, 1)), rng.choice(words, size=(batch, text_len))], axis=1)
    pixels = rng.standard_normal((int(grid.prod(-1).sum()), v.patch_dim)).astype(np.float32)
    return dict(input_ids=input_ids.astype(np.int64), attention_mask=np.ones_like(input_ids), pixel_values=pixels,
                image_grid_thw=grid)


def sample_batch(converted_dir, batch: int = 2, seed: int = 0) -> dict:
    """The random sample `verify` runs, for the converted directory's model family, as keyword arguments."""
    family = family_of(converted_dir)
    cfg = family.config(converted_dir)
    if family is QWEN2_5_VL:
        return qwen_sample_inputs(cfg, batch=batch, seed=seed)
    return dict(zip(("input_ids", "pixel_values", "attention_mask"), sample_inputs(cfg, batch=batch, seed=seed)))


def our_logits(converted_dir, **inputs) -> np.ndarray:
    """Logits of our model loaded from a converted directory, computed in fp32."""
    model = load_pretrained(converted_dir, dtype=np.float32)
    return np.asarray(model(**inputs).logits)


def hf_logits(hf_dir, weight_dtype: str | None, **inputs) -> np.ndarray:
    """Logits of transformers' PyTorch model, weights rounded to `weight_dtype` as ours were, computed in fp32."""
    import torch

    load_dtype = getattr(torch, weight_dtype) if weight_dtype else torch.float32
    mask = torch.from_numpy(inputs["attention_mask"])
    tensors = {k: torch.from_numpy(v) for k, v in inputs.items()}
    if family_of(hf_dir) is QWEN2_5_VL:
        from transformers import Qwen2_5_VLForConditionalGeneration as Model

        # transformers builds M-RoPE positions only when told which tokens are image tokens (1)
        cfg = Qwen25VLConfig.from_json(hf_dir)
        tensors["mm_token_type_ids"] = (tensors["input_ids"] == cfg.image_token_id).long()
    else:
        from transformers import LlavaForConditionalGeneration as Model

        tensors["position_ids"] = torch.where(mask > 0, mask.cumsum(-1) - 1, 0)
    model = Model.from_pretrained(str(hf_dir), dtype=load_dtype, attn_implementation="eager").float().eval()
    with torch.no_grad():
        return model(**tensors).logits.float().numpy()


def verify(converted_dir, hf_dir, *, batch: int = 2, seed: int = 0) -> float:
    """Largest |logit difference| between our model (from `converted_dir`) and transformers' (from `hf_dir`).

    Both run in fp32 on the same random sample; transformers' weights are first cast to the converted dtype,
    so both models hold the same weights whatever `--dtype` was.
    """
    dtypes = orbax_io.read_marker(converted_dir)["dtypes"]
    weight_dtype = dtypes[0] if len(dtypes) == 1 else None
    inputs = sample_batch(converted_dir, batch=batch, seed=seed)
    ours = our_logits(converted_dir, **inputs)
    theirs = hf_logits(hf_dir, weight_dtype, **inputs)
    return float(np.max(np.abs(ours - theirs)))


def default_tolerance(converted_dir) -> float:
    dtypes = orbax_io.read_marker(converted_dir)["dtypes"]
    return max(DEFAULT_TOLERANCE.get(d, 2e-2) for d in dtypes)


# ---------------------------------------------------------------------------------------------- CLI


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m checkpoints_conversion.hf_to_orbax",
        description="Convert a Hugging Face LLaVA-1.5 or Qwen2.5-VL checkpoint directory (config.json + "
                    "safetensors or pytorch_model.bin, single or sharded, any of the accepted key layouts) into a "
                    "blink-jax orbax directory, loadable with blink_jax.load_pretrained(out).",
        epilog="Example: python -m checkpoints_conversion.hf_to_orbax --hf-dir llava-1.5-7b-hf "
               "--out llava-1.5-7b-jax --dtype bfloat16 --verify")
    p.add_argument("--hf-dir", required=True,
                   help="Hugging Face LLaVA or Qwen2.5-VL directory (config.json, weights, tokenizer) or Hub id "
                        "(llava-hf/llava-1.5-7b-hf, Qwen/Qwen2.5-VL-7B-Instruct)")
    p.add_argument("--out", required=True, help="output directory; must not exist or be empty (see --overwrite)")
    p.add_argument("--dtype", choices=DTYPES, default=None,
                   help="store parameters in this dtype (default: keep the checkpoint's own dtype)")
    p.add_argument("--verify", action="store_true",
                   help="after converting, run our model and transformers' on a random image + prompt and "
                        "report the largest absolute logit difference (needs memory for both models in fp32)")
    p.add_argument("--tolerance", type=float, default=None,
                   help="--verify fails above this |logit difference| "
                        f"(default: {DEFAULT_TOLERANCE['float32']} for fp32 weights, looser for bf16/fp16)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it already holds files")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    if args.verify and importlib.util.find_spec("torch") is None:  # check before a long conversion, not after
        print(f"error: --verify runs transformers' PyTorch model, and PyTorch is not installed: {TORCH_HINT}; "
              f"or convert without --verify", file=sys.stderr)
        return 2
    try:
        args.hf_dir = resolve_model_dir(args.hf_dir)  # a directory, or a Hugging Face Hub id
        out = convert(args.hf_dir, args.out, args.dtype, overwrite=args.overwrite, progress=not args.no_progress)
    except (ConfigError, CheckpointError, FileExistsError, ModelNotFoundError) as e:
        print(f"error: {e}\nnothing was written to '{args.out}'", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    if not args.verify:
        return 0
    diff = verify(out, args.hf_dir)
    tol = args.tolerance if args.tolerance is not None else default_tolerance(out)
    print(f"verify: max |logit difference| vs transformers = {diff:.3g} (tolerance {tol:g})")
    if not diff <= tol:
        print("error: verification FAILED: the converted model does not reproduce transformers' logits",
              file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
