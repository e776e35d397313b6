"""blink-jax as an lmms-eval model, registered through lmms-eval's `lmms_eval.models` entry point (pyproject.toml),
so an installed blink-jax is found by an unmodified lmms-eval (tested with the version pinned in pyproject's
`lmms` extra):

    lmms-eval --model blink_jax --tasks pope --batch_size 8 --log_samples --output_path out \\
        --model_args pretrained=llava-hf/llava-1.5-7b-hf,mode=blink,tokensr=TOKENSR_DIR

model_args (comma-separated key=value):
    pretrained    LLaVA-1.5 directory (Hugging Face or converted) or Hugging Face Hub id (required)
    revision      the Hub revision (branch, tag or commit) of a Hub id
    mode          vanilla | interp | blink (`eval.harness.modes`; default blink with tokensr, else interp)
    tokensr       trained TokenSR directory (`python -m train.tokensr`'s export); needed by mode blink
    tau_exp, tau_drop, layers ("12-18"; ranges, since commas separate model_args), region_size   Blink's knobs
    dtype         bfloat16 (default) | float32 | float16
    bucket        prompts are left-padded to a multiple of this many tokens (default 64)
    max_new_tokens   caps the task's max_new_tokens (lmms-eval's POPE asks 128; eval.run's POPE takes 16)
    pad_to_square    False: llava-hf's centre crop instead of LLaVA's padding
    mesh          only the default (none): inference runs on one device
The batch size is lmms-eval's `--batch_size`.

Questions are asked as `eval.run` asks them: LLaVA-1.5's `vicuna_v1` prompt with the image before the task's text
(`build_prompt`; an `<image>` the text holds is taken out), LLaVA's tokenisation, greedy decoding in fixed-shape
batches over length buckets (`eval.harness.batching`), so a question's answer does not depend on its batch. An
answer is cut at the task's `until` strings. A question that cannot be asked (not exactly one image, an image
that cannot be decoded) is answered "" and so counts as wrong; a warning lists them.
"""

from __future__ import annotations

import json
import os
import sys
from collections.abc import Sequence
from typing import Any

from lmms_eval.api.model import lmms
from lmms_eval.models.registry_v2 import ModelManifest

DEFAULT_MAX_NEW_TOKENS = 1024  # when a task sets none (lmms-eval's LLaVA models do the same)


class PluginError(ValueError):
    """A model_arg or request the plugin cannot run: names it and the fix."""


class BlinkJax(lmms):
    """LLaVA-1.5 in one of the paper's modes, answering lmms-eval's `generate_until` requests."""

    is_simple = True

    def __init__(self, pretrained: str | None = None, revision: str | None = None, mode: str | None = None,
                 tokensr: str | None = None, tau_exp: float | None = None, tau_drop: float | None = None,
                 layers: str | int | None = None, region_size: int | None = None, dtype: str = "bfloat16",
                 batch_size: int | str = 1, bucket: int = 64, max_new_tokens: int | None = None,
                 pad_to_square: bool = True, mesh: str | None = None, device: str | None = None,
                 max_batch_size: int | None = None, **unknown: Any) -> None:
        super().__init__()
        import jax.numpy as jnp

        from blink_jax import load_pretrained
        from blink_jax.hub import resolve_model_dir
        from blink_jax.processing import Processor
        from blink_jax import ConfigError
        from blink_jax.blink.config import parse_layers
        from eval.harness.modes import ModeError, build_modes, check_fit
        from eval.harness.runner import DTYPES

        if unknown:
            raise PluginError(f"blink_jax: unknown model_args {sorted(unknown)}; use pretrained, revision, mode, "
                              f"tokensr, tau_exp, tau_drop, layers, region_size, dtype, bucket, max_new_tokens, "
                              f"pad_to_square, mesh (see eval/lmms_plugin.py)")
        if not pretrained:
            raise PluginError("blink_jax: model_args lack pretrained=: give a LLaVA-1.5 directory or a Hugging Face "
                              "Hub id, e.g. --model_args pretrained=llava-hf/llava-1.5-7b-hf")
        if mesh not in (None, "", "none"):
            raise PluginError(f"blink_jax: mesh={mesh!r}: inference (load_pretrained, generate) runs on one device; "
                              f"meshes exist for TokenSR training only (python -m train.tokensr --mesh): leave mesh "
                              f"out")
        if device is not None:
            raise PluginError(f"blink_jax: --device {device!r}: JAX picks the device (set JAX_PLATFORMS, or "
                              f"CUDA_VISIBLE_DEVICES): leave --device out")
        if int(os.environ.get("WORLD_SIZE", "1")) > 1:
            raise PluginError("blink_jax runs in one process: launch lmms-eval without accelerate/torchrun "
                              "processes (WORLD_SIZE > 1)")
        if dtype not in DTYPES:
            raise PluginError(f"blink_jax: dtype={dtype!r} is unknown; use one of {', '.join(DTYPES)}")
        self.batch_size_per_device = _positive("--batch_size", batch_size, fix="a number (auto is not supported)")
        if max_batch_size is not None:
            raise PluginError("blink_jax: --max_batch_size is for --batch_size auto, which blink_jax does not support: "
                              "give --batch_size N")
        self.bucket = _positive("bucket", bucket)
        self.max_new_tokens = None if max_new_tokens is None else _positive("max_new_tokens", max_new_tokens)

        model_dir = resolve_model_dir(str(pretrained), revision=None if revision is None else str(revision))
        mode = mode or ("blink" if tokensr else "interp")
        if mode == "crop":  # two passes per batch, with the original images: eval.run's harness only
            raise PluginError("blink_jax: mode=crop (the two-pass baseline) runs in python -m eval.run --modes crop, "
                              "not in lmms-eval: use mode=vanilla, interp or blink here")
        self.processor = Processor.from_pretrained(model_dir, pad_to_square=bool(pad_to_square))
        cfg = self.processor.config
        try:
            self.mode = build_modes([mode], tokensr_dir=tokensr,
                                    layers=None if layers is None else parse_layers(str(layers)),
                                    region_size=region_size, tau_exp=tau_exp, tau_drop=tau_drop)[0]
            check_fit([self.mode], num_layers=cfg.text.num_hidden_layers, grid=cfg.vision.grid,
                      hidden_size=cfg.text.hidden_size, tokensr_dir=tokensr)
        except (ModeError, ConfigError) as e:
            raise PluginError(f"blink_jax model_args (named as eval.run's flags there): {e}") from None
        self.model = load_pretrained(model_dir, dtype=getattr(jnp, dtype))
        text = cfg.text
        self.pad_id = int(text.pad_token_id if text.pad_token_id is not None else self.processor.pad_id)
        self.eos_id = text.eos_token_id

    @property
    def batch_size(self) -> int:
        return self.batch_size_per_device

    def generate_until(self, requests) -> list[str]:
        """One answer per request, in request order. Requests with the same generation settings are batched by
        prompt length: one compiled program per (settings, bucket)."""
        from tqdm import tqdm

        from eval.harness.batching import pad_batch, plan_batches, prefetch

        args = [req.args for req in requests]  # (context, gen_kwargs, doc_to_visual, doc_id, task, split)
        settings = [self._generation(gen_kwargs, task) for _, gen_kwargs, _, _, task, _ in args]
        answers, failed, ids = [""] * len(args), [], {}
        for i, (context, _, _, doc_id, task, _) in enumerate(args):
            try:
                ids[i] = self._prompt_ids(context)
            except ValueError as e:
                failed.append(f"{task} doc {doc_id}: {e}")
        groups: dict[str, list[int]] = {}
        for i in ids:
            groups.setdefault(json.dumps(settings[i], sort_keys=True), []).append(i)
        batches = [batch for group in groups.values()
                   for batch in plan_batches(group, [len(ids[i]) for i in group], bucket=self.bucket,
                                             batch_size=self.batch_size)]
        bar = tqdm(total=len(args), initial=len(args) - len(ids), desc=f"blink_jax {self.mode.name}",
                   disable=self.rank != 0)
        for batch, rows in zip(batches, prefetch(lambda b: [self._pixels(args[i]) for i in b.items], batches)):
            ok = [(i, px) for i, (px, error) in zip(batch.items, rows) if error is None]
            failed += [f"{args[i][4]} doc {args[i][3]}: {error}" for i, (_, error) in zip(batch.items, rows) if error]
            if ok:
                gen = settings[ok[0][0]]
                inputs = pad_batch([ids[i] for i, _ in ok], [px for _, px in ok], length=batch.length,
                                   batch_size=self.batch_size, pad_id=self.pad_id)
                tokens = self.model.generate(**inputs, max_new_tokens=gen["max_new_tokens"], blink=self.mode.blink,
                                             tokensr=self.mode.tokensr)
                for row, (i, _) in enumerate(ok):
                    answers[i] = _cut(self._decode(tokens[row]), gen["until"])
            bar.update(len(batch.items))
        bar.close()
        if failed:
            print(f"blink_jax: {len(failed)} question(s) could not be asked and are answered \"\" (scored wrong): "
                  f"{'; '.join(failed[:3])}{'; ...' if len(failed) > 3 else ''}", file=sys.stderr)
        for (context, gen_kwargs, *_), answer in zip(args, answers):
            self.cache_hook.add_partial("generate_until", (context, gen_kwargs), answer)
        return answers

    def _generation(self, gen_kwargs: dict, task: str) -> dict:
        """A request's generation settings, checked: greedy only."""
        gen = dict(gen_kwargs or {})
        if gen.get("do_sample") or float(gen.get("temperature") or 0) > 0:
            raise PluginError(f"task {task!r} asks for sampling (do_sample={gen.get('do_sample')}, temperature="
                              f"{gen.get('temperature')}); blink_jax decodes greedily: run it with temperature 0")
        if int(gen.get("num_beams") or 1) != 1:
            raise PluginError(f"task {task!r} asks for beam search (num_beams={gen['num_beams']}); blink_jax decodes "
                              f"greedily: run it with num_beams 1")
        until = gen.get("until") or []
        until = [until] if isinstance(until, str) else list(until)
        steps = int(gen.get("max_new_tokens") or DEFAULT_MAX_NEW_TOKENS)
        if self.max_new_tokens is not None:
            steps = min(steps, self.max_new_tokens)
        return {"max_new_tokens": steps, "until": until}

    def _prompt_ids(self, context: str) -> list[int]:
        """LLaVA-1.5's eval prompt around the task's text (the `<image>` goes first), as token ids [T]."""
        from blink_jax.processing import IMAGE_PLACEHOLDER, build_prompt

        return self.processor.tokenize(build_prompt(context.replace(IMAGE_PLACEHOLDER, "").strip(), suffix=None))

    def _pixels(self, request: tuple):
        """(pixel values [3, H, W], None) of a request's one image, or (None, why it cannot be asked)."""
        _, _, doc_to_visual, doc_id, task, split = request
        try:
            visuals = doc_to_visual(self.task_dict[task][split][doc_id])
            if len(visuals) != 1:
                return None, f"LLaVA-1.5 takes one image per question, the task gives {len(visuals)}"
            return self.processor.pixel_values(visuals)[0], None
        except Exception as e:  # noqa: BLE001 - one bad image is reported, the run goes on
            return None, f"{type(e).__name__}: {e}"

    def _decode(self, tokens) -> str:
        tokens = [int(t) for t in tokens]
        if self.eos_id is not None and self.eos_id in tokens:
            tokens = tokens[:tokens.index(self.eos_id)]
        return self.processor.tokenizer.decode(tokens, skip_special_tokens=True).strip()

    def loglikelihood(self, requests):
        raise PluginError("blink_jax answers generate_until tasks only (no loglikelihood): choose a "
                          "generation task such as pope, mme, gqa, mmbench, scienceqa_img")

    def generate_until_multi_round(self, requests):
        raise PluginError("blink_jax answers single-turn generate_until tasks only (no multi-round): choose a "
                          "single-turn task")


def _positive(name: str, value, fix: str = "a positive integer") -> int:
    try:
        number = int(value)
    except (TypeError, ValueError):
        number = 0
    if number < 1 or str(number) != str(value).strip():
        raise PluginError(f"blink_jax: {name}={value!r} must be {fix}")
    return number


def _cut(text: str, until: Sequence[str]) -> str:
    """`text` up to the first of the stop strings (lmms-eval's `until`)."""
    for stop in until:
        if stop:
            text = text.split(stop)[0]
    return text


MANIFEST = ModelManifest(model_id="blink_jax", simple_class_path="eval.lmms_plugin.BlinkJax")
