"""Train a small LLaVA-1.5 from scratch on the shapes task, export it as a Hugging Face directory, evaluate it.

Packing. Every question of the task has the same number of tokens, and under causal attention the prompt up
to the image run (system prompt + `USER:` + 144 image tokens) does not depend on the question. So one
training row holds one image and K questions:

    [prefix P tokens][question 1 + answer + </s>][question 2 + answer + </s>] ... [question K ...]

where block k sees the prefix and itself only, and its position ids continue from P as if it were the only
question. Each block then computes exactly what the plain prompt `build_prompt(question)` computes (the test
checks this against `blink_jax.model.forward.prefill`), at ~1/8 of the cost for K = 8. The loss is the
next-token cross-entropy of the answer word and the `</s>` after it; nothing else is supervised.

Letters: B batch (images), K questions per image, T packed length, D model dim, V vocab.
"""

from __future__ import annotations

import dataclasses
import functools
import json
import math
import os
import platform
import time
from collections.abc import Callable, Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from blink_jax.config import LlavaConfig
from blink_jax.loading import flat_params, model_from_params
from blink_jax.model.llava import LlavaModel
from blink_jax.model.ops import attention
from blink_jax.processing import build_prompt, preprocess_image, tokenize_with_image
from train.demo import shapes
from train.demo.tokenizer import ANSWERS, BOS_ID, EOS_ID, IMAGE_ID, PAD_ID, build_tokenizer, vocabulary

# ------------------------------------------------------------------------------------------------ config


@dataclasses.dataclass(frozen=True)
class DemoModelConfig:
    """Sizes of the demo LLaVA. The vision tower's last layer is the feature layer (vision_feature_layer=-1):
    with a from-scratch tower there is no reason to train a layer that LLaVA would then skip."""
    image_size: int = 168
    patch_size: int = 14
    vision_width: int = 128
    vision_layers: int = 4
    vision_heads: int = 4
    vision_mlp: int = 512
    text_width: int = 192
    text_layers: int = 6
    text_heads: int = 6
    text_kv_heads: int = 2
    text_mlp: int = 512
    max_positions: int = 512
    rope_theta: float = 10000.0

    @classmethod
    def tiny(cls) -> "DemoModelConfig":
        """For tests: 56 px images (4x4 patches) and a 2-layer decoder."""
        return cls(image_size=56, vision_width=32, vision_layers=2, vision_heads=2, vision_mlp=64, text_width=48,
                   text_layers=2, text_heads=3, text_kv_heads=1, text_mlp=96)

    def hf_config(self):
        """The transformers `LlavaConfig` of this model."""
        from transformers import CLIPVisionConfig, LlamaConfig
        from transformers import LlavaConfig as HFLlavaConfig

        text = LlamaConfig(
            vocab_size=len(vocabulary()), hidden_size=self.text_width, intermediate_size=self.text_mlp,
            num_hidden_layers=self.text_layers, num_attention_heads=self.text_heads,
            num_key_value_heads=self.text_kv_heads, max_position_embeddings=self.max_positions, rms_norm_eps=1e-5,
            bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID, tie_word_embeddings=False)
        text.rope_parameters = {"rope_type": "default", "rope_theta": self.rope_theta}
        vision = CLIPVisionConfig(
            hidden_size=self.vision_width, intermediate_size=self.vision_mlp, num_hidden_layers=self.vision_layers,
            num_attention_heads=self.vision_heads, image_size=self.image_size, patch_size=self.patch_size,
            projection_dim=self.vision_width, hidden_act="quick_gelu")
        hf = HFLlavaConfig(vision_config=vision, text_config=text, image_token_index=IMAGE_ID,
                           projector_hidden_act="gelu", vision_feature_layer=-1,
                           vision_feature_select_strategy="default", tie_word_embeddings=False)
        hf.dtype = "float32"  # compute dtype transformers picks by default; the stored tensors may be smaller
        return hf

    def llava_config(self) -> LlavaConfig:
        return LlavaConfig.from_hf_config(self.hf_config())


@dataclasses.dataclass(frozen=True)
class TrainSettings:
    steps: int = 1200
    batch_size: int = 16  # images per step
    questions_per_image: int = 8
    lr: float = 2e-3
    warmup_steps: int = 60
    weight_decay: float = 0.05
    clip_norm: float = 1.0
    p_zoom: float = 0.4
    seed: int = 0
    eval_every: int = 100
    val_images: int = 192
    log_every: int = 10


# ------------------------------------------------------------------------------------------------ init


_RESIDUAL_OUT = ("o_proj", "out_proj", "down_proj", "fc2")


def init_model(cfg: LlavaConfig, seed: int) -> LlavaModel:
    """From-scratch weights: N(0, 0.02) for matrices and embeddings (residual-branch outputs scaled by
    1/sqrt(2 x layers), as GPT-2 does), zero biases, unit norms."""
    model = LlavaModel(cfg, param_dtype=jnp.float32, rngs=nnx.Rngs(seed))
    key = jax.random.key(seed)
    params = {}
    for i, (path, value) in enumerate(sorted(flat_params(model).items(), key=lambda kv: str(kv[0]))):
        name = path[-1]
        if name in ("bias",):
            params[path] = jnp.zeros_like(value)
        elif name in ("scale",):
            params[path] = jnp.ones_like(value)
        else:  # kernel, embedding, class_embedding
            std = 0.02
            if any(p in _RESIDUAL_OUT for p in path):
                layers = cfg.vision.num_hidden_layers if path[0] == "vision_tower" else cfg.text.num_hidden_layers
                std /= math.sqrt(2 * layers)
            params[path] = std * jax.random.normal(jax.random.fold_in(key, i), value.shape, jnp.float32)
    return model_from_params(cfg, params)


# ------------------------------------------------------------------------------------------------ packing


@dataclasses.dataclass(frozen=True)
class PackedLayout:
    """Token layout of one packed row, shared by every row: ids, positions and the block-diagonal mask."""
    prefix: tuple[int, ...]  # [P] ids up to the end of the image run
    tails: dict[str, tuple[int, ...]]  # class -> ids after the image run, ending with "ASSISTANT :"
    k: int  # questions per row
    answer_ids: tuple[int, int]  # ("Yes", "No")

    @classmethod
    def build(cls, tokenizer, cfg: LlavaConfig, k: int) -> "PackedLayout":
        prefix, tails = None, {}
        for name in shapes.CLASSES:
            ids = tokenize_with_image(tokenizer, build_prompt(shapes.question_text(*name.split())),
                                      cfg.image_token_index, cfg.num_image_tokens)
            cut = max(i for i, t in enumerate(ids) if t == cfg.image_token_index) + 1
            if prefix is not None and tuple(ids[:cut]) != prefix:
                raise ValueError("prompts differ before the image: packing needs one shared prefix")
            prefix, tails[name] = tuple(ids[:cut]), tuple(ids[cut:])
        if len({len(t) for t in tails.values()}) != 1:
            raise ValueError("questions tokenise to different lengths: packing needs one block length")
        answer_ids = tuple(tokenizer.convert_tokens_to_ids(a) for a in ANSWERS)
        return cls(prefix, tails, k, answer_ids)

    @property
    def block(self) -> int:  # question tail + answer + </s>
        return len(next(iter(self.tails.values()))) + 2

    @property
    def length(self) -> int:
        return len(self.prefix) + self.k * self.block

    def positions(self) -> np.ndarray:  # [T]
        p = len(self.prefix)
        return np.concatenate([np.arange(p)] + [np.arange(p, p + self.block)] * self.k).astype(np.int32)

    def segments(self) -> np.ndarray:  # [T] 0 = prefix, k + 1 = question block k
        return np.repeat(np.arange(self.k + 1), [len(self.prefix)] + [self.block] * self.k).astype(np.int32)

    def mask(self) -> np.ndarray:  # [T, T] bool: query i may attend to key j
        pos, seg = self.positions(), self.segments()
        same = (seg[None, :] == 0) | (seg[None, :] == seg[:, None])
        return same & (pos[None, :] <= pos[:, None])

    def target_index(self) -> np.ndarray:  # [K, 2] rows whose logits predict the answer and the </s>
        start = len(self.prefix) + self.block * np.arange(self.k)
        return np.stack([start + self.block - 3, start + self.block - 2], axis=1).astype(np.int32)

    def pack(self, questions: Sequence[Sequence[tuple[str, str, bool]]]) -> dict[str, np.ndarray]:
        """Per image, up to K (colour, shape, answer) -> input_ids [B, T], targets [B, K, 2], weights [B, K].
        Missing questions are padded with a copy of the first block's tokens and weight 0."""
        b = len(questions)
        ids = np.full((b, self.length), PAD_ID, np.int32)
        targets = np.zeros((b, self.k, 2), np.int32)
        weights = np.zeros((b, self.k), np.float32)
        p, blk = len(self.prefix), self.block
        for row, qs in enumerate(questions):
            if len(qs) > self.k:
                raise ValueError(f"{len(qs)} questions for one image, the layout holds {self.k}")
            ids[row, :p] = self.prefix
            filler = qs[0] if qs else ("red", "circle", False)
            for j in range(self.k):
                colour, shape, answer = qs[j] if j < len(qs) else filler
                answer_id = self.answer_ids[0 if answer else 1]
                ids[row, p + j * blk: p + (j + 1) * blk] = self.tails[f"{colour} {shape}"] + (answer_id, EOS_ID)
                targets[row, j] = (answer_id, EOS_ID)
                weights[row, j] = float(j < len(qs))
        return {"input_ids": ids, "targets": targets, "weights": weights}


def packed_logits(model: LlavaModel, layout: PackedLayout, input_ids: jax.Array, pixel_values: jax.Array
                  ) -> jax.Array:  # [B, K, 2, V]
    """Logits at the rows that predict each block's answer and its `</s>`.

    Runs the model's own decoder layers piece by piece (norm, q/k/v projections, attention, o_proj, MLP) so
    that attention is computed in two parts, prefix-on-prefix and each block on prefix + itself, instead of
    over the whole packed row with a block mask: the same numbers (`layout.mask()` is what it implements)
    at about half the attention cost.
    """
    h = model.embed_multimodal(input_ids, pixel_values)  # [B, T, D]
    b, p, k, blk = input_ids.shape[0], len(layout.prefix), layout.k, layout.block
    positions = jnp.broadcast_to(jnp.asarray(layout.positions()), (b, layout.length))
    prefix_mask = jnp.tril(jnp.ones((p, p), bool))[None]  # [1, P, P]
    block_mask = jnp.concatenate([jnp.ones((blk, p), bool), jnp.tril(jnp.ones((blk, blk), bool))], 1)[None]
    for layer in model.language_model.layers:
        q, kk, v = layer.self_attn.project(layer.input_layernorm(h), positions)  # [B, T, N|K, H]
        out_prefix = attention(q[:, :p], kk[:, :p], v[:, :p], prefix_mask)  # [B, P, N, H]
        fold = lambda x: x[:, p:].reshape(b * k, blk, *x.shape[2:])  # [B K, L, ., H]
        spread = lambda x: jnp.repeat(x[:, :p], k, axis=0)  # [B K, P, ., H]
        out_blocks = attention(fold(q), jnp.concatenate([spread(kk), fold(kk)], 1),
                               jnp.concatenate([spread(v), fold(v)], 1), block_mask)  # [B K, L, N, H]
        out = jnp.concatenate([out_prefix, out_blocks.reshape(b, k * blk, *out_blocks.shape[2:])], 1)
        h = h + layer.self_attn.o_proj(out)
        h = h + layer.mlp(layer.post_attention_layernorm(h))
    index = jnp.asarray(layout.target_index())  # [K, 2]
    return model.language_model.logits(h[:, index.reshape(-1)]).reshape(b, layout.k, 2, -1)


def loss_and_metrics(model: LlavaModel, layout: PackedLayout, batch: dict) -> tuple[jax.Array, dict]:
    logits = packed_logits(model, layout, batch["input_ids"], batch["pixel_values"])  # [B, K, 2, V]
    nll = optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"])  # [B, K, 2]
    w = batch["weights"]
    n = jnp.maximum(w.sum(), 1.0)
    correct = (jnp.argmax(logits[:, :, 0], -1) == batch["targets"][:, :, 0]).astype(jnp.float32)
    loss = (nll.sum(-1) * w).sum() / (2 * n)
    return loss, {"loss": loss, "answer_loss": (nll[:, :, 0] * w).sum() / n, "accuracy": (correct * w).sum() / n}


# ------------------------------------------------------------------------------------------------ data


def view_rows(views: Sequence[shapes.View], layout: PackedLayout, image_size: int,
              questions: Sequence[Sequence[tuple[str, str, bool]]]) -> dict[str, np.ndarray]:
    batch = layout.pack(questions)
    batch["pixel_values"] = np.stack([preprocess_image(v.image, image_size=image_size) for v in views])
    return batch


def train_batch(step: int, settings: TrainSettings, layout: PackedLayout, image_size: int) -> dict[str, np.ndarray]:
    """Batch `step` of the run: images step*B .. step*B + B - 1 of the training stream, a function of the seed."""
    views, questions = [], []
    for i in range(step * settings.batch_size, (step + 1) * settings.batch_size):
        view = _resized(shapes.training_view(settings.seed, shapes.TRAIN, i, p_zoom=settings.p_zoom), image_size)
        rng = np.random.default_rng([settings.seed, shapes.TRAIN, i, 1])
        views.append(view)
        questions.append(shapes.sample_questions(rng, view, settings.questions_per_image))
    return view_rows(views, layout, image_size, questions)


def _resized(view: shapes.View, image_size: int) -> shapes.View:
    """Scenes are drawn at 168 px; a model of another size (the tests') sees them resized, sizes scaled."""
    if view.image.size == (image_size, image_size):
        return view
    from PIL import Image

    s = image_size / view.image.size[0]
    return dataclasses.replace(view, image=view.image.resize((image_size,) * 2, Image.Resampling.BICUBIC),
                               objects=tuple((n, z * s) for n, z in view.objects))


@dataclasses.dataclass
class ValSet:
    """Fixed validation images (stream VAL): full scenes and zoomed crops, with each question's size bucket."""
    name: str
    batches: list[dict[str, np.ndarray]]
    buckets: list[np.ndarray]  # per batch [B, K] bucket names ("" for padding)


def val_set(name: str, settings: TrainSettings, layout: PackedLayout, image_size: int, n_images: int, *,
            zoom: bool, batch_size: int) -> ValSet:
    batches, buckets = [], []
    for start in range(0, n_images, batch_size):
        views, questions, names = [], [], []
        for i in range(start, min(start + batch_size, n_images)):
            rng = shapes.item_rng(settings.seed, shapes.VAL, 2 * i + int(zoom))
            view = shapes.training_view(settings.seed, shapes.VAL, 2 * i + int(zoom), p_zoom=float(zoom))
            view = _resized(view, image_size)
            qs = shapes.sample_questions(rng, view, layout.k)
            views.append(view)
            questions.append(qs)
            names.append([shapes.question_bucket(view.objects, f"{c} {s}") for c, s, _ in qs]
                         + [""] * (layout.k - len(qs)))
        batches.append(view_rows(views, layout, image_size, questions))
        buckets.append(np.asarray(names))
    return ValSet(name, batches, buckets)


# ------------------------------------------------------------------------------------------------ training


def optimizer(settings: TrainSettings) -> optax.GradientTransformation:
    schedule = optax.warmup_cosine_decay_schedule(0.0, settings.lr, settings.warmup_steps, settings.steps,
                                                  end_value=0.05 * settings.lr)
    decay = lambda params: jax.tree.map(lambda x: x.ndim >= 2, params)  # no decay on biases and norms
    return optax.chain(optax.clip_by_global_norm(settings.clip_norm),
                       optax.adamw(schedule, b1=0.9, b2=0.98, weight_decay=settings.weight_decay, mask=decay))


def make_steps(graphdef, layout: PackedLayout, tx: optax.GradientTransformation):
    """(train_step, eval_step), pure functions of (params, ...) jitted once."""

    def loss_fn(params, batch):
        return loss_and_metrics(nnx.merge(graphdef, params), layout, batch)

    @functools.partial(jax.jit, donate_argnums=(0, 1))
    def train_step(params, opt_state, batch):
        (_, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, batch)
        updates, opt_state = tx.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        return params, opt_state, {**metrics, "grad_norm": optax.global_norm(grads)}

    @jax.jit
    def eval_step(params, batch):  # -> the greedy first answer token [B, K]
        logits = packed_logits(nnx.merge(graphdef, params), layout, batch["input_ids"], batch["pixel_values"])
        return jnp.argmax(logits[:, :, 0], -1)

    return train_step, eval_step


def evaluate(eval_step, params, val: ValSet) -> dict:
    """Answer accuracy over a ValSet, overall and per size bucket (sub_patch = tiny + small)."""
    correct, names = [], []
    for batch, buckets in zip(val.batches, val.buckets):
        c = np.asarray(eval_step(params, {k: batch[k] for k in ("input_ids", "pixel_values")})) == batch["targets"][..., 0]
        keep = batch["weights"] > 0
        correct.append(c[keep])
        names.append(buckets[keep])
    return accuracy_by_bucket(np.concatenate(correct), np.concatenate(names), prefix=val.name)


def accuracy_by_bucket(correct: np.ndarray, buckets: np.ndarray, prefix: str) -> dict:
    out = {f"{prefix}/accuracy": float(correct.mean()), f"{prefix}/n": int(correct.size)}
    groups = {name: buckets == name for name, _, _ in shapes.SIZE_BUCKETS}
    groups["sub_patch"] = np.isin(buckets, shapes.SUB_PATCH)
    groups["none"] = buckets == "none"
    for name, sel in groups.items():
        if sel.any():
            out[f"{prefix}/acc_{name}"] = float(correct[sel].mean())
    return out


@dataclasses.dataclass
class TrainResult:
    model: LlavaModel
    history: list[dict]
    final: dict
    seconds: float


def train(model_cfg: DemoModelConfig, settings: TrainSettings, *, log: Callable[[dict], None] = lambda m: None,
          progress: bool = True) -> TrainResult:
    """Trains from scratch; every `log_every` steps and at each eval, `log(metrics)`."""
    from tqdm import tqdm

    cfg = model_cfg.llava_config()
    tokenizer = build_tokenizer()
    layout = PackedLayout.build(tokenizer, cfg, settings.questions_per_image)
    model = init_model(cfg, settings.seed)
    graphdef, params = nnx.split(model)
    tx = optimizer(settings)
    opt_state = tx.init(params)
    train_step, eval_step = make_steps(graphdef, layout, tx)
    vals = [val_set(name, settings, layout, cfg.vision.image_size, n, zoom=zoom, batch_size=settings.batch_size)
            for name, n, zoom in (("val", settings.val_images, False), ("val_zoom", settings.val_images // 2, True))
            if n > 0]
    history, start, running = [], time.time(), []
    bar = tqdm(range(settings.steps), desc="demo backbone", disable=not progress, dynamic_ncols=True)
    final = {}
    for step in bar:
        batch = train_batch(step, settings, layout, cfg.vision.image_size)
        params, opt_state, metrics = train_step(params, opt_state, batch)
        running.append(metrics)
        last = step + 1 == settings.steps
        if (step + 1) % settings.log_every == 0 or last:
            host = {k: float(np.mean([float(m[k]) for m in running])) for k in running[0]}
            if not all(math.isfinite(v) for v in host.values()):
                raise FloatingPointError(f"step {step + 1}: non-finite metrics {host}; lower --lr")
            running = []
            record = {"step": step + 1, "seconds": round(time.time() - start, 1), **host}
            if (step + 1) % settings.eval_every == 0 or last:
                for val in vals:
                    record.update(evaluate(eval_step, params, val))
            history.append(record)
            log(record)
            bar.set_postfix(loss=f"{host['loss']:.3f}", acc=f"{host['accuracy']:.3f}",
                            val=f"{record.get('val/accuracy', float('nan')):.3f}")
            final = record
    return TrainResult(nnx.merge(graphdef, params), history, final, time.time() - start)


# ------------------------------------------------------------------------------------------------ export


def hf_tensors(model: LlavaModel, dtype=np.float16) -> dict[str, np.ndarray]:
    """Our parameters in the transformers-5 `save_pretrained` key layout, as `dtype` numpy arrays."""
    from checkpoints_conversion.param_mapping import build_mapping, saved_key

    params = flat_params(model)
    out = {}
    for entry in build_mapping(model.config):
        x = np.asarray(params[entry.path], np.float32)
        out[saved_key(entry.hf_key)] = np.ascontiguousarray(entry.transform.to_hf(x)).astype(dtype)
    return out


def save_hf(model: LlavaModel, model_cfg: DemoModelConfig, out_dir: str | os.PathLike, *, dtype=np.float16,
            extra_files: dict[str, str] | None = None, overwrite: bool = True) -> Path:
    """Writes a Hugging Face LLaVA directory atomically: config.json, generation_config.json, model.safetensors,
    tokenizer files, and `extra_files` (name -> text)."""
    from safetensors.numpy import save_file
    from transformers import GenerationConfig

    from checkpoints_conversion.orbax_io import atomic_dir

    with atomic_dir(out_dir, overwrite) as tmp:
        model_cfg.hf_config().save_pretrained(str(tmp))
        GenerationConfig(bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID, do_sample=False,
                         max_new_tokens=16).save_pretrained(str(tmp))
        save_file(hf_tensors(model, dtype), str(tmp / "model.safetensors"), metadata={"format": "pt"})
        build_tokenizer(tmp)
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text)
    return Path(out_dir).absolute()


def run_info(model_cfg: DemoModelConfig, settings: TrainSettings, result: TrainResult, command: str) -> dict:
    import flax
    import transformers

    return {"command": command, "model": dataclasses.asdict(model_cfg), "settings": dataclasses.asdict(settings),
            "train_seconds": round(result.seconds, 1), "final": result.final,
            "versions": {"jax": jax.__version__, "flax": flax.__version__, "optax": optax.__version__,
                         "transformers": transformers.__version__, "python": platform.python_version()},
            "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                        "devices": [str(d) for d in jax.devices()]}}


# ------------------------------------------------------------------------------------------------ POPE eval


def evaluate_pope(model: LlavaModel, data_dir: str | os.PathLike, *, batch_size: int = 16) -> dict:
    """Vanilla answers (the greedy first token) to a POPE-format shapes set written by `shapes.write_pope`:
    eval_pope.py's metrics per split and accuracy per size bucket (`shapes.question_bucket`)."""
    from eval.benchmarks.pope import confusion_metrics

    data_dir = Path(data_dir)
    scenes = shapes.read_annotations(data_dir)
    rows = {split: [json.loads(line) for line in open(data_dir / f"coco_pope_{split}.json")]
            for split in shapes.SPLITS}
    unique: dict[str, dict[str, bool]] = {}
    for split_rows in rows.values():
        for r in split_rows:
            name = r["text"].removeprefix("Is there a ").removesuffix(" in the image?")
            unique.setdefault(r["image"], {})[name] = r["label"] == "yes"
    cfg = model.config
    layout = PackedLayout.build(build_tokenizer(), cfg, max(len(q) for q in unique.values()))
    graphdef, params = nnx.split(model)
    _, eval_step = make_steps(graphdef, layout, optax.identity())
    from PIL import Image

    said_yes: dict[tuple[str, str], bool] = {}
    no_id = layout.answer_ids[1]
    images = sorted(unique)
    for start in range(0, len(images), batch_size):
        chunk = images[start:start + batch_size]
        views = [shapes.View(Image.open(data_dir / "val2014" / name).convert("RGB"), (), frozenset(), None)
                 for name in chunk]
        questions = [[(*n.split(), label) for n, label in unique[name].items()] for name in chunk]
        batch = view_rows(views, layout, cfg.vision.image_size, questions)
        first = np.asarray(eval_step(params, {k: batch[k] for k in ("input_ids", "pixel_values")}))
        for row, name in enumerate(chunk):
            for j, (c, s, _) in enumerate(questions[row]):
                said_yes[(name, f"{c} {s}")] = int(first[row, j]) != no_id  # eval_pope: anything but "No" is yes
    out = {"splits": {}, "buckets": {}}
    all_correct, all_buckets = [], []
    for split, split_rows in rows.items():
        preds, labels, correct, buckets = [], [], [], []
        for r in split_rows:
            name = r["text"].removeprefix("Is there a ").removesuffix(" in the image?")
            preds.append("yes" if said_yes[(r["image"], name)] else "no")
            labels.append(r["label"])
            correct.append(preds[-1] == r["label"])
            objects = tuple((o.name, o.size) for o in scenes[r["image"]].objects)
            buckets.append(shapes.question_bucket(objects, name))
        out["splits"][split] = confusion_metrics(preds, labels)
        out["buckets"][split] = accuracy_by_bucket(np.asarray(correct), np.asarray(buckets), prefix=split)
        all_correct += correct
        all_buckets += buckets
    out["buckets"]["all"] = accuracy_by_bucket(np.asarray(all_correct), np.asarray(all_buckets), prefix="all")
    return out
