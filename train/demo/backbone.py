"""Train a small LLaVA-1.5 from scratch on the shapes task, export it as a Hugging Face directory, evaluate it.

Two stages, as LLaVA itself starts from a pretrained CLIP:

1. vision: the ViT alone, with a linear probe on its feature layer that predicts, per patch, which of the
   30 classes overlap it (sigmoid cross-entropy). Cheap (no language model) and a dense signal, so the
   tower learns to see small shapes in far fewer images than the yes/no answers alone would teach it.
2. llava: the whole model on packed yes/no questions (below), the probe's loss still added with
   `aux_weight` so the tower keeps its local detail. The probe is not part of the exported model.
   A grounding loss (`ground_weight`) on the middle layers (`ground_layers`) teaches the row that answers to
   attend, among the image tokens, to the patches of the object asked about when it is there (and, with
   `ground_background`, to the empty background when it is not): the attention Blink's saliency reads.

Packing. Every question of the task has the same number of tokens, and under causal attention the prompt up
to the image run (system prompt + `USER:` + 144 image tokens) does not depend on the question. So one
training row holds one image and K questions:

    [prefix P tokens][question 1 + answer + </s>][question 2 + answer + </s>] ... [question K ...]

where block k sees the prefix and itself only, and its position ids continue from P as if it were the only
question. Each block then computes exactly what the plain prompt `build_prompt(question)` computes (the test
checks this against `blink_jax.model.forward.prefill`), at ~1/8 of the cost for K = 8. The loss is the
next-token cross-entropy of the answer word and the `</s>` after it, plus (`lm_weight`) that of the
question's own words: its colour and shape words can only be guessed from the image, so this loss teaches the
decoder to look things up in the image long before the yes/no answer alone does.

Letters: B batch (images), K questions per image, T packed length, P patches, C classes, D model dim, V vocab.
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
from blink_jax.model.decoder import prompt_stream, walk
from blink_jax.model.llava import LlavaModel
from blink_jax.model.ops import attention
from blink_jax.processing import build_prompt, preprocess_image, tokenize_with_image
from blink_jax.weights.orbax_io import atomic_dir
from blink_jax.weights.param_mapping import build_mapping, saved_key
from blink_jax.weights.params import flat_params, model_from_params
from demo import shapes
from demo.pope import confusion_metrics
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
    text_width: int = 128
    text_layers: int = 6
    text_heads: int = 4
    text_kv_heads: int = 2
    text_mlp: int = 384
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
    vision_steps: int = 500  # stage 1
    vision_batch_size: int = 32
    vision_lr: float = 2e-3
    steps: int = 1800  # stage 2
    batch_size: int = 8  # images per step
    questions_per_image: int = 12
    lr: float = 1e-3
    lm_weight: float = 0.5
    aux_weight: float = 0.5
    ground_weight: float = 1.0
    ground_layers: tuple[int, ...] = (1, 2, 3)
    ground_background: bool = False  # also ground the "no" questions, on the empty patches
    ground_lookalikes: bool = False  # ground the "no" questions on the shapes they could be mistaken for
    name_weight: float = 0.0  # each image token names the shape centred on it (`name_loss`)
    easy_steps: int = 0  # stage 2's first steps show scenes of EASY_OBJECTS shapes only (`train_batch`)
    warmup_steps: int = 30  # each stage
    weight_decay: float = 0.05
    clip_norm: float = 1.0
    p_zoom: float = 0.45  # crops of the original (shapes.CROP_GEOMETRIES)
    p_teacher: float = 0.1  # upsampled regions of the downsampled scene, as TokenSR's teacher sees them
    p_shape: float = 0.0  # negatives in a present colour, told apart by shape only (shapes.sample_questions)
    p_sibling: float = 0.0  # negatives in another checked colour of a present check's shape (World.checked)
    world: shapes.World = shapes.World()  # how scenes are drawn (shapes.World; the bundled demo's: checked squares)
    seed: int = 0
    eval_every: int = 100
    val_images: int = 128
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
        if name == "bias":
            params[path] = jnp.zeros_like(value)
        elif name == "scale":
            params[path] = jnp.ones_like(value)
        else:  # kernel, embedding, class_embedding
            std = 0.02
            if any(p in _RESIDUAL_OUT for p in path):
                layers = cfg.vision.num_hidden_layers if path[0] == "vision_tower" else cfg.text.num_hidden_layers
                std /= math.sqrt(2 * layers)
            params[path] = std * jax.random.normal(jax.random.fold_in(key, i), value.shape, jnp.float32)
    return model_from_params(cfg, params)


def init_probe(cfg: LlavaConfig, seed: int) -> dict[str, jax.Array]:
    """The stage-1 patch classifier: vision feature [Dv] -> logits over the classes and "nothing" [C + 1]."""
    key = jax.random.fold_in(jax.random.key(seed), 10_000)
    kernel = 0.02 * jax.random.normal(key, (cfg.vision.hidden_size, len(shapes.CLASSES) + 1), jnp.float32)
    return {"kernel": kernel, "bias": jnp.zeros((len(shapes.CLASSES) + 1,), jnp.float32)}


# ------------------------------------------------------------------------------------------------ packing


@dataclasses.dataclass(frozen=True)
class PackedLayout:
    """Token layout of one packed row, shared by every row: ids, positions and the block-diagonal mask."""
    prefix: tuple[int, ...]  # [P] ids up to the end of the image run
    tails: tuple[tuple[str, tuple[int, ...]], ...]  # (class, ids after the image run, ending "ASSISTANT :")
    k: int  # questions per row
    answer_ids: tuple[int, int]  # ("Yes", "No")
    num_image_tokens: int

    @classmethod
    def build(cls, tokenizer, cfg: LlavaConfig, k: int) -> "PackedLayout":
        prefix, tails = None, []
        for name in shapes.CLASSES:
            ids = tokenize_with_image(tokenizer, build_prompt(shapes.question_text(*name.split())),
                                      cfg.image_token_index, cfg.num_image_tokens)
            cut = max(i for i, t in enumerate(ids) if t == cfg.image_token_index) + 1
            if prefix is not None and tuple(ids[:cut]) != prefix:
                raise ValueError("prompts differ before the image: packing needs one shared prefix")
            prefix = tuple(ids[:cut])
            tails.append((name, tuple(ids[cut:])))
        if len({len(t) for _, t in tails}) != 1:
            raise ValueError("questions tokenise to different lengths: packing needs one block length")
        answer_ids = tuple(tokenizer.convert_tokens_to_ids(a) for a in ANSWERS)
        return cls(prefix, tuple(tails), k, answer_ids, cfg.num_image_tokens)

    @functools.cached_property
    def tail(self) -> dict[str, tuple[int, ...]]:
        return dict(self.tails)

    @property
    def block(self) -> int:  # question tail + answer + </s>
        return len(self.tails[0][1]) + 2

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

    @property
    def answer_row(self) -> int:  # row of a block that predicts the answer (the question's last token)
        return self.block - 3

    def block_index(self) -> np.ndarray:  # [K, L - 1] each block's rows but its last (the </s> predicts nothing)
        start = len(self.prefix) + self.block * np.arange(self.k)
        return (start[:, None] + np.arange(self.block - 1)[None]).astype(np.int32)

    def pack(self, questions: Sequence[Sequence[tuple[str, str, bool]]]) -> dict[str, np.ndarray]:
        """Per image, up to K (colour, shape, answer) -> input_ids [B, T], block_targets [B, K, L - 1] (each
        block row's next token; the last two are the answer and the </s>), targets [B, K, 2] (those two) and
        weights [B, K]. Missing questions are padded with a copy of the first block's tokens and weight 0."""
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
                ids[row, p + j * blk: p + (j + 1) * blk] = self.tail[f"{colour} {shape}"] + (answer_id, EOS_ID)
                targets[row, j] = (answer_id, EOS_ID)
                weights[row, j] = float(j < len(qs))
        block_targets = ids[:, self.block_index() + 1]  # [B, K, L - 1]
        return {"input_ids": ids, "targets": targets, "block_targets": block_targets, "weights": weights}

    def question_patches(self, views: Sequence[shapes.View], questions: Sequence[Sequence[tuple[str, str, bool]]],
                         grid: int, background: bool = False, lookalikes: bool = False) -> np.ndarray:  # [B, K, P]
        """Per question, where the answering row should look among the image tokens: the patches of the object
        asked about when it is in view; for a "no", nothing (all zero), or with `background` the empty patches
        (no shape touches them), so that what attention brings back says yes (that object) or no (background).
        With `lookalikes`, a "no" looks at the shapes in view of the asked colour (else of the asked shape):
        what it could be mistaken for, so that the answer has to come from what that shape is."""
        out = np.zeros((len(views), self.k, grid * grid), np.float32)
        for row, (view, qs) in enumerate(zip(views, questions)):
            empty = shapes.patch_targets(view, grid)[:, -1] if background else np.zeros(grid * grid, np.float32)
            for j, (colour, shape, answer) in enumerate(qs):
                if answer:
                    out[row, j] = shapes.class_patches(view, f"{colour} {shape}", grid)
                    continue
                out[row, j] = empty
                if lookalikes:
                    names = {n for n in view.present if n.split()[0] == colour} or {
                        n for n in view.present if n.split()[1] == shape}
                    if names:
                        out[row, j] = np.clip(sum(shapes.class_patches(view, n, grid) for n in names), 0, 1)
        return out


def vision_features(model: LlavaModel, pixel_values: jax.Array) -> jax.Array:  # [B, P, Dv]
    """The feature-layer patch states LLaVA projects (CLS dropped, `vision_feature_select_strategy="default"`)."""
    states = model.vision_tower.hidden_states(pixel_values, model.config.feature_layers)
    return jnp.concatenate([s[:, 1:] for s in states], axis=-1)


def packed_forward(model: LlavaModel, layout: PackedLayout, input_ids: jax.Array, pixel_values: jax.Array,
                   attention_layers: tuple[int, ...] = ()
                   ) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
    """Logits at every row of each question block but its last (see `block_index`) [B, K, L - 1, V], the vision
    features [B, P, Dv], at each of `attention_layers` the answering row's attention over the image tokens alone
    (renormalised over them, mean over heads: what Blink's saliency reads) [A, B, K, P], and the logits at the
    image tokens [B, P, V] (`name_loss`).

    The image run sits at the end of the shared prefix, so the projected patches are spliced in by slicing.
    The model's own decoder walk runs with attention computed in two parts (`attend=`), prefix-on-prefix and
    each block on prefix + itself, instead of over the whole packed row with a block mask: the same numbers
    (`layout.mask()` is what it implements) at about half the attention cost; the maps are a hook.
    """
    b, p, k, blk = input_ids.shape[0], len(layout.prefix), layout.k, layout.block
    features = vision_features(model, pixel_values)
    text = model.language_model.embed(input_ids)  # [B, T, D]
    image = model.multi_modal_projector(features).astype(text.dtype)
    h = jnp.concatenate([text[:, :p - layout.num_image_tokens], image, text[:, p:]], axis=1)
    positions = jnp.broadcast_to(jnp.asarray(layout.positions()), (b, layout.length))
    prefix_mask = jnp.tril(jnp.ones((p, p), bool))[None]  # [1, P, P]
    block_mask = jnp.concatenate([jnp.ones((blk, p), bool), jnp.tril(jnp.ones((blk, blk), bool))], 1)[None]
    fold = lambda x: x[:, p:].reshape(b * k, blk, *x.shape[2:])  # [B K, L, ., H]
    spread = lambda x: jnp.repeat(x[:, :p], k, axis=0)  # [B K, P, ., H]
    image_start = p - layout.num_image_tokens

    def packed_attention(q, kk, v):  # [B, T, N|K, H] -> [B, T, N, H]
        out_prefix = attention(q[:, :p], kk[:, :p], v[:, :p], prefix_mask)  # [B, P, N, H]
        out_blocks = attention(fold(q), jnp.concatenate([spread(kk), fold(kk)], 1),
                               jnp.concatenate([spread(v), fold(v)], 1), block_mask)  # [B K, L, N, H]
        return jnp.concatenate([out_prefix, out_blocks.reshape(b, k * blk, *out_blocks.shape[2:])], 1)

    def ground_map(index, stream, q, kk):  # the answering rows' attention over the image: [B, K, P]
        return stream, image_attention(fold(q)[:, layout.answer_row], kk[:, image_start:p]).reshape(b, k, -1)

    stream = prompt_stream(h, positions, jnp.ones((b, layout.length), bool))  # `packed_attention` does the masking
    stream, _, maps = walk(model.language_model.layers, stream, hooks={i: ground_map for i in attention_layers},
                           attend=packed_attention)
    h = stream.h
    index = jnp.asarray(layout.block_index())  # [K, L - 1]
    logits = model.language_model.logits(h[:, index.reshape(-1)]).reshape(b, k, blk - 1, -1)
    image_logits = model.language_model.logits(h[:, image_start:p])
    return logits, features, jnp.stack(maps) if maps else jnp.zeros((0, b, k, layout.num_image_tokens)), image_logits


def image_attention(q: jax.Array, image_keys: jax.Array) -> jax.Array:  # [B K, P]
    """Attention of one query row per block over the image tokens only, mean over heads.
    q [B K, N, H] (rows of the folded blocks), image_keys [B, P, Kv, H]."""
    bk, n, hd = q.shape
    b, _, kv, _ = image_keys.shape
    q = q.reshape(b, bk // b, kv, n // kv, hd)  # [B, K, Kv, G, H]
    logits = jnp.einsum("BKVGH,BPVH->BKVGP", q, image_keys, preferred_element_type=jnp.float32) / math.sqrt(hd)
    probs = jax.nn.softmax(logits, axis=-1)
    return probs.mean(axis=(2, 3)).reshape(bk, -1)


def ground_loss(maps: jax.Array, patches: jax.Array) -> tuple[jax.Array, dict]:
    """-log of the image attention that falls on each question's target patches (`question_patches`), mean over
    the questions that have any and over layers. maps [A, B, K, P] (rows sum to 1), patches [B, K, P] (0/1)."""
    mass = (maps * patches[None]).sum(-1)  # [A, B, K]
    has = (patches.sum(-1) > 0).astype(jnp.float32)[None]  # [1, B, K]
    n = jnp.maximum(has.sum() * maps.shape[0], 1.0)
    loss = (-jnp.log(mass + 1e-6) * has).sum() / n
    return loss, {"ground_loss": loss, "ground_mass": (mass * has).sum() / n}


def packed_logits(model: LlavaModel, layout: PackedLayout, input_ids: jax.Array, pixel_values: jax.Array
                  ) -> jax.Array:  # [B, K, 2, V]
    """Logits of the rows that predict each block's answer and the `</s>` after it."""
    return packed_forward(model, layout, input_ids, pixel_values)[0][:, :, -2:]


def probe_loss(probe: dict, features: jax.Array, targets: jax.Array) -> tuple[jax.Array, dict]:
    """Cross-entropy of the patch classifier against `shapes.patch_targets` (rows of weights over the classes
    and "nothing"; all-zero rows carry no loss): the mean over patches with a shape's centre plus the mean
    over empty patches, so the few centres weigh as much as the many empty patches.
    features [B, P, Dv], targets [B, P, C + 1]."""
    logits = features @ probe["kernel"] + probe["bias"]  # [B, P, C + 1]
    total = targets.sum(-1)  # [B, P]
    dist = targets / jnp.maximum(total, 1)[..., None]
    ce = optax.softmax_cross_entropy(logits, dist)  # [B, P]
    empty = targets[..., -1] > 0
    centre = (total > 0) & ~empty
    loss = (jnp.where(centre, ce, 0).sum() / jnp.maximum(centre.sum(), 1)
            + jnp.where(empty, ce, 0).sum() / jnp.maximum(empty.sum(), 1))
    hit = jnp.take_along_axis(dist, jnp.argmax(logits, -1)[..., None], -1)[..., 0] > 0
    return loss, {"probe_loss": loss, "probe_object_acc": (hit & centre).sum() / jnp.maximum(centre.sum(), 1),
                  "probe_empty_acc": (hit & empty).sum() / jnp.maximum(empty.sum(), 1)}


def name_words(tokenizer) -> np.ndarray:  # [C, V]
    """Per class, the word distribution an image token holding it is taught to name (`name_loss`): half its
    colour word, half its shape word."""
    vocab = tokenizer.get_vocab()
    out = np.zeros((len(shapes.CLASSES), len(vocab)), np.float32)
    for i, name in enumerate(shapes.CLASSES):
        for word in name.split():
            out[i, vocab[word]] += 0.5
    return out


def name_loss(image_logits: jax.Array, targets: jax.Array, words: jax.Array) -> tuple[jax.Array, dict]:
    """Each image token that holds a shape's centre names it, at the decoder's output: cross-entropy against
    `name_words` of its class (shared when several centres fall in one patch), mean over those tokens. A dense
    signal, as the vision probe is, but through the decoder: its image tokens carry the colour and shape words
    the questions ask with. image_logits [B, P, V], targets [B, P, C + 1] (`shapes.patch_targets`), words [C, V]."""
    classes = targets[..., :-1]  # [B, P, C]
    total = classes.sum(-1)
    dist = jnp.einsum("BPC,CV->BPV", classes / jnp.maximum(total, 1)[..., None], words)
    centre = total > 0
    ce = optax.softmax_cross_entropy(image_logits, dist)
    loss = jnp.where(centre, ce, 0).sum() / jnp.maximum(centre.sum(), 1)
    return loss, {"name_loss": loss}


def question_lm_loss(logits: jax.Array, targets: jax.Array, weights: jax.Array) -> tuple[jax.Array, dict]:
    """Next-token cross-entropy over a question's own words, summed over the question, mean over questions.
    Most words are the fixed template; the two that are not, the colour (after "a") and the shape (after the
    colour), can only be guessed from the image, which is what makes this loss useful.
    logits [B, K, Q, V], targets [B, K, Q]."""
    nll = optax.softmax_cross_entropy_with_integer_labels(logits, targets).sum(-1)  # [B, K]
    loss = (nll * weights).sum() / jnp.maximum(weights.sum(), 1.0)
    return loss, {"question_lm_loss": loss}


def qa_loss(logits: jax.Array, targets: jax.Array, weights: jax.Array) -> tuple[jax.Array, dict]:
    """Cross-entropy of each answer word and the `</s>` after it. logits [B, K, 2, V], targets [B, K, 2]."""
    nll = optax.softmax_cross_entropy_with_integer_labels(logits, targets)  # [B, K, 2]
    n = jnp.maximum(weights.sum(), 1.0)
    correct = (jnp.argmax(logits[:, :, 0], -1) == targets[:, :, 0]).astype(jnp.float32)
    loss = (nll.sum(-1) * weights).sum() / (2 * n)
    return loss, {"qa_loss": loss, "answer_loss": (nll[:, :, 0] * weights).sum() / n,
                  "accuracy": (correct * weights).sum() / n}


# ------------------------------------------------------------------------------------------------ data


def view_rows(views: Sequence[shapes.View], layout: PackedLayout | None, image_size: int, grid: int,
              questions: Sequence[Sequence[tuple[str, str, bool]]] | None = None, *,
              background: bool = False, lookalikes: bool = False) -> dict[str, np.ndarray]:
    """Views (+ questions) -> the model's arrays: pixel_values, patch_targets (+ the packed ids)."""
    batch = layout.pack(questions) if layout is not None else {}
    if layout is not None:
        batch["question_patches"] = layout.question_patches(views, questions, grid, background, lookalikes)
    batch["pixel_values"] = np.stack([preprocess_image(v.image, image_size=image_size) for v in views])
    batch["patch_targets"] = np.stack([shapes.patch_targets(v, grid) for v in views])
    return batch


EASY_OBJECTS = (1, 2)  # shapes per scene in stage 2's first `easy_steps` steps


def _views(settings: TrainSettings, stream: int, indices: range, image_size: int, p_zoom: float,
           p_teacher: float = 0.0, n_objects: tuple[int, int] = shapes.N_OBJECTS):
    return [shapes.training_view(settings.seed, stream, i, p_zoom=p_zoom, p_teacher=p_teacher,
                                 world=settings.world, n_objects=n_objects).resized(image_size)
            for i in indices]


def vision_batch(step: int, settings: TrainSettings, cfg: LlavaConfig) -> dict[str, np.ndarray]:
    """Stage-1 batch `step`: images of the training stream from 10^8 on, so stage 2 never sees them again."""
    b = settings.vision_batch_size
    views = _views(settings, shapes.TRAIN, range(10**8 + step * b, 10**8 + (step + 1) * b), cfg.vision.image_size,
                   settings.p_zoom, settings.p_teacher)
    return view_rows(views, None, cfg.vision.image_size, cfg.vision.grid)


def train_batch(step: int, settings: TrainSettings, layout: PackedLayout, cfg: LlavaConfig) -> dict[str, np.ndarray]:
    """Stage-2 batch `step`: images step*B .. step*B + B - 1 of the training stream, a function of the seed. In
    the first `easy_steps` steps the scenes hold EASY_OBJECTS shapes instead of shapes.N_OBJECTS: a question is then
    about the one or two shapes there, an easier start for learning to look its colour up in the image."""
    b = settings.batch_size
    indices = range(step * b, (step + 1) * b)
    n_objects = EASY_OBJECTS if step < settings.easy_steps else shapes.N_OBJECTS
    views = _views(settings, shapes.TRAIN, indices, cfg.vision.image_size, settings.p_zoom, settings.p_teacher,
                   n_objects)
    questions = [shapes.sample_questions(np.random.default_rng([settings.seed, shapes.TRAIN, i, 1]), v,
                                         settings.questions_per_image, settings.p_shape,
                                         settings.p_sibling, settings.world.classes)
                 for i, v in zip(indices, views)]
    return view_rows(views, layout, cfg.vision.image_size, cfg.vision.grid, questions,
                     background=settings.ground_background, lookalikes=settings.ground_lookalikes)


@dataclasses.dataclass
class ValSet:
    """Fixed validation images (stream VAL): full scenes or zoomed crops, with each question's size bucket."""
    name: str
    batches: list[dict[str, np.ndarray]]
    buckets: list[np.ndarray]  # per batch [B, K] bucket names ("" for padding)


def val_set(name: str, settings: TrainSettings, layout: PackedLayout, cfg: LlavaConfig, n_images: int, *,
            zoom: bool) -> ValSet:
    batches, buckets = [], []
    for start in range(0, n_images, settings.batch_size):
        indices = range(2 * start + int(zoom), 2 * min(start + settings.batch_size, n_images), 2)
        views = _views(settings, shapes.VAL, indices, cfg.vision.image_size, float(zoom))
        questions = [shapes.sample_questions(np.random.default_rng([settings.seed, shapes.VAL, i, 1]), v, layout.k,
                                             classes=settings.world.classes)
                     for i, v in zip(indices, views)]
        batches.append(view_rows(views, layout, cfg.vision.image_size, cfg.vision.grid, questions))
        # buckets by the size as shown, in scene pixels (SIZE_BUCKETS' unit): a zoomed object counts as larger
        shown = [[(n, z * shapes.SCENE_SIZE / v.image.size[0]) for n, z, *_ in v.objects] for v in views]
        buckets.append(np.asarray([[shapes.question_bucket(o, f"{c} {s}") for c, s, _ in qs]
                                   + [""] * (layout.k - len(qs)) for o, qs in zip(shown, questions)]))
    return ValSet(name, batches, buckets)


# ------------------------------------------------------------------------------------------------ steps


def optimizer(lr: float, steps: int, settings: TrainSettings) -> optax.GradientTransformation:
    schedule = optax.warmup_cosine_decay_schedule(0.0, lr, min(settings.warmup_steps, max(steps - 1, 1)),
                                                  max(steps, 2), end_value=0.05 * lr)
    decay = lambda params: jax.tree.map(lambda x: x.ndim >= 2, params)  # no decay on biases and norms
    return optax.chain(optax.clip_by_global_norm(settings.clip_norm),
                       optax.adamw(schedule, b1=0.9, b2=0.98, weight_decay=settings.weight_decay, mask=decay))


def vision_optimizer(settings: TrainSettings):
    return optimizer(settings.vision_lr, settings.vision_steps, settings)


def llava_optimizer(settings: TrainSettings):
    return optimizer(settings.lr, settings.steps, settings)


def _train_step(loss_fn, tx: optax.GradientTransformation):
    """(params, opt_state, batch) -> (params, opt_state, metrics + grad_norm), jitted, donating the state."""

    @functools.partial(jax.jit, donate_argnums=(0, 1))
    def step(params, opt_state, batch):
        (_, metrics), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, batch)
        updates, opt_state = tx.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, {**metrics, "grad_norm": optax.tree.norm(grads)}

    return step


# Step functions are cached per (graphdef, layout, settings): equal configs share one compiled program.
@functools.lru_cache(maxsize=16)
def vision_step_fn(graphdef, feature_layers: tuple[int, ...], settings: TrainSettings):
    """Stage 1: params = {"vision": vision tower state, "probe": probe}."""
    tx = vision_optimizer(settings)

    def loss_fn(params, batch):
        features = vision_features_of(graphdef, params["vision"], batch["pixel_values"], feature_layers)
        return probe_loss(params["probe"], features, batch["patch_targets"])

    return _train_step(loss_fn, tx)


def vision_features_of(graphdef, vision_state, pixel_values, feature_layers: tuple[int, ...]):  # [B, P, Dv]
    """`vision_features` of a vision tower given as (graphdef, state)."""
    states = nnx.merge(graphdef, vision_state).hidden_states(pixel_values, feature_layers)
    return jnp.concatenate([s[:, 1:] for s in states], axis=-1)


@functools.lru_cache(maxsize=16)
def llava_step_fn(graphdef, layout: PackedLayout, settings: TrainSettings):
    """Stage 2: params = {"model": LlavaModel state, "probe": probe}."""
    tx = llava_optimizer(settings)
    words = jnp.asarray(name_words(build_tokenizer()))

    def loss_fn(params, batch):
        logits, features, maps, image_logits = packed_forward(
            nnx.merge(graphdef, params["model"]), layout, batch["input_ids"], batch["pixel_values"],
            settings.ground_layers)
        loss, metrics = qa_loss(logits[:, :, -2:], batch["targets"], batch["weights"])
        lm, lm_metrics = question_lm_loss(logits[:, :, :-2], batch["block_targets"][:, :, :-2], batch["weights"])
        aux, probe_metrics = probe_loss(params["probe"], features, batch["patch_targets"])
        total = loss + settings.lm_weight * lm + settings.aux_weight * aux
        ground_metrics = {}
        if settings.ground_layers:
            ground, ground_metrics = ground_loss(maps, batch["question_patches"] * batch["weights"][..., None])
            total = total + settings.ground_weight * ground
        name_metrics = {}
        if settings.name_weight:
            name, name_metrics = name_loss(image_logits, batch["patch_targets"], words)
            total = total + settings.name_weight * name
        return total, {**metrics, **lm_metrics, **probe_metrics, **ground_metrics, **name_metrics}

    return _train_step(loss_fn, tx)


@functools.lru_cache(maxsize=16)
def answer_fn(graphdef, layout: PackedLayout):
    """(model state, input_ids, pixel_values) -> the greedy first answer token [B, K]."""

    @jax.jit
    def answer(state, input_ids, pixel_values):
        logits = packed_logits(nnx.merge(graphdef, state), layout, input_ids, pixel_values)
        return jnp.argmax(logits[:, :, 0], -1)

    return answer


def evaluate(answer, state, val: ValSet) -> dict:
    """Answer accuracy over a ValSet, overall and per size bucket (sub_patch = tiny + small)."""
    correct, names = [], []
    for batch, buckets in zip(val.batches, val.buckets):
        first = np.asarray(answer(state, batch["input_ids"], batch["pixel_values"]))
        keep = batch["weights"] > 0
        correct.append((first == batch["targets"][..., 0])[keep])
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
            out[f"{prefix}/n_{name}"] = int(sel.sum())
    return out


# ------------------------------------------------------------------------------------------------ training


@dataclasses.dataclass
class TrainResult:
    model: LlavaModel
    probe: dict[str, jax.Array]  # the stage-1 patch classifier (`init_probe`), saved beside the model
    history: list[dict]
    final: dict
    seconds: float
    cpu_seconds: float


def _host(running: list[dict]) -> dict:
    host = {k: float(np.mean([float(m[k]) for m in running])) for k in running[0]}
    if not all(math.isfinite(v) for v in host.values()):
        raise FloatingPointError(f"non-finite metrics {host}: lower the learning rate")
    return host


def train(model_cfg: DemoModelConfig, settings: TrainSettings, *, log: Callable[[dict], None] = lambda m: None,
          progress: bool = True, init: tuple[LlavaModel, dict[str, jax.Array]] | None = None) -> TrainResult:
    """Both stages, from scratch or from `init` (a model of `model_cfg` and its probe, as `load_backbone` reads
    them: a curriculum; `vision_steps` may then be 0); every `log_every` steps and at each eval, `log(metrics)`."""
    from tqdm import tqdm

    cfg = model_cfg.llava_config()
    bad = [l for l in settings.ground_layers if not 0 <= l < cfg.text.num_hidden_layers]
    if bad:
        raise ValueError(f"ground_layers={settings.ground_layers}: layer {bad[0]} is not one of the decoder's "
                         f"{cfg.text.num_hidden_layers} layers (0..{cfg.text.num_hidden_layers - 1})")
    layout = PackedLayout.build(build_tokenizer(), cfg, settings.questions_per_image)
    if init is None:
        model, probe = init_model(cfg, settings.seed), init_probe(cfg, settings.seed)
    else:
        model, probe = init
        if model.config != cfg:
            raise ValueError("the model to start from is not of the sizes asked for: give the sizes it was trained "
                             "with (its demo_backbone.json, 'model')")
    vals = [val_set(name, settings, layout, cfg, n, zoom=zoom)
            for name, n, zoom in (("val", settings.val_images, False), ("val_zoom", settings.val_images // 2, True))
            if n > 0]
    history, final = [], {}
    start, cpu_start = time.time(), time.process_time()
    bar = tqdm(total=settings.vision_steps + settings.steps, desc="demo backbone", disable=not progress,
               dynamic_ncols=True)

    def record(stage: str, step: int, running: list[dict], extra: dict | None = None) -> dict:
        host = _host(running)  # waits for the steps, so the times below are theirs
        rec = {"stage": stage, "step": step, "seconds": round(time.time() - start, 1),
               "cpu_seconds": round(time.process_time() - cpu_start, 1), **host, **(extra or {})}
        history.append(rec)
        log(rec)
        return rec

    # Stage 1: the vision tower and the patch probe.
    vision_graph, vision_state = nnx.split(model.vision_tower)
    params = {"vision": vision_state, "probe": probe}
    opt_state = vision_optimizer(settings).init(params)
    step_fn, running = vision_step_fn(vision_graph, cfg.feature_layers, settings), []
    for step in range(settings.vision_steps):
        params, opt_state, metrics = step_fn(params, opt_state, vision_batch(step, settings, cfg))
        running.append(metrics)
        bar.update()
        if (step + 1) % settings.log_every == 0 or step + 1 == settings.vision_steps:
            rec = record("vision", step + 1, running)
            running = []
            bar.set_postfix(stage="vision", loss=f"{rec['probe_loss']:.3f}", acc=f"{rec['probe_object_acc']:.2f}")
    nnx.update(model.vision_tower, params["vision"])
    probe = params["probe"]
    del params, opt_state

    # Stage 2: everything, on packed questions.
    graphdef, state = nnx.split(model)
    params = {"model": state, "probe": probe}
    opt_state = llava_optimizer(settings).init(params)
    step_fn, answer, running = llava_step_fn(graphdef, layout, settings), answer_fn(graphdef, layout), []
    for step in range(settings.steps):
        params, opt_state, metrics = step_fn(params, opt_state, train_batch(step, settings, layout, cfg))
        running.append(metrics)
        bar.update()
        last = step + 1 == settings.steps
        if (step + 1) % settings.log_every == 0 or last:
            extra = {}
            if (step + 1) % settings.eval_every == 0 or last:
                for val in vals:
                    extra.update(evaluate(answer, params["model"], val))
            final = record("llava", step + 1, running, extra)
            running = []
            bar.set_postfix(stage="llava", loss=f"{final['qa_loss']:.3f}", acc=f"{final['accuracy']:.3f}",
                            val=f"{final.get('val/accuracy', float('nan')):.3f}")
    bar.close()
    return TrainResult(nnx.merge(graphdef, params["model"]), params["probe"], history, final, time.time() - start,
                       time.process_time() - cpu_start)


# ------------------------------------------------------------------------------------------------ export


def hf_tensors(model: LlavaModel, dtype=np.float16) -> dict[str, np.ndarray]:
    """Our parameters in the transformers-5 `save_pretrained` key layout, as `dtype` numpy arrays."""
    params = flat_params(model)
    out = {}
    for entry in build_mapping(model.config):
        x = np.asarray(params[entry.path], np.float32)
        out[saved_key(entry.hf_key)] = np.ascontiguousarray(entry.transform.to_hf(x)).astype(dtype)
    return out


PROBE_FILE = "probe.safetensors"  # the stage-1 patch classifier, beside the model: not part of LLaVA


def save_hf(model: LlavaModel, model_cfg: DemoModelConfig, out_dir: str | os.PathLike, *, dtype=np.float16,
            extra_files: dict[str, str] | None = None, overwrite: bool = True,
            probe: dict[str, jax.Array] | None = None) -> Path:
    """Writes a Hugging Face LLaVA directory atomically: config.json, generation_config.json, model.safetensors,
    tokenizer files, `extra_files` (name -> text) and the `probe` (float32, PROBE_FILE)."""
    from safetensors.numpy import save_file
    from transformers import GenerationConfig

    with atomic_dir(out_dir, overwrite) as tmp:
        model_cfg.hf_config().save_pretrained(str(tmp))
        GenerationConfig(bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=PAD_ID, do_sample=False,
                         max_new_tokens=16).save_pretrained(str(tmp))
        save_file(hf_tensors(model, dtype), str(tmp / "model.safetensors"), metadata={"format": "pt"})
        build_tokenizer(tmp)
        for name, text in (extra_files or {}).items():
            (tmp / name).write_text(text)
        if probe is not None:
            save_file({k: np.asarray(v, np.float32) for k, v in probe.items()}, str(tmp / PROBE_FILE))
    return Path(out_dir).absolute()


def load_backbone(model_dir: str | os.PathLike, new_probe_seed: int | None = None
                  ) -> tuple[LlavaModel, dict[str, jax.Array]]:
    """A demo backbone written by `save_hf`, in float32, with its saved patch probe (to train on from it); with
    `new_probe_seed`, a fresh probe (`init_probe`) instead, so that any LLaVA directory of the demo's sizes will
    do (backbones saved before the probe was, e.g. a converted one, have none)."""
    from safetensors.numpy import load_file

    from blink_jax.loading import load_model

    if new_probe_seed is not None:
        model = load_model(model_dir, jnp.float32)
        return model, init_probe(model.config, new_probe_seed)
    probe_path = Path(model_dir) / PROBE_FILE
    if not probe_path.is_file():
        raise FileNotFoundError(f"'{probe_path}' is missing: this backbone has no saved patch probe (`python -m "
                                f"train.demo_backbone` writes one beside the backbones it trains); to train on from "
                                f"it anyway, pass --new-probe")
    return load_model(model_dir, jnp.float32), {k: jnp.asarray(v) for k, v in load_file(str(probe_path)).items()}


def run_info(model_cfg: DemoModelConfig, settings: TrainSettings, result: TrainResult, command: str) -> dict:
    import flax
    import transformers

    n_params = sum(int(np.prod(v.shape)) for v in flat_params(result.model).values())
    return {"command": command, "model": dataclasses.asdict(model_cfg), "parameters": n_params,
            "settings": dataclasses.asdict(settings), "train_seconds": round(result.seconds, 1),
            "train_cpu_seconds": round(result.cpu_seconds, 1), "final": result.final,
            "versions": {"jax": jax.__version__, "flax": flax.__version__, "optax": optax.__version__,
                         "transformers": transformers.__version__, "python": platform.python_version()},
            "machine": {"platform": platform.platform(), "cpus": os.cpu_count(),
                        "devices": [str(d) for d in jax.devices()]}}


# ------------------------------------------------------------------------------------------------ POPE eval


def _class_of(text: str) -> str:
    return text.removeprefix("Is there a ").removesuffix(" in the image?")


def evaluate_pope(model: LlavaModel, data_dir: str | os.PathLike, *, batch_size: int = 16) -> dict:
    """Vanilla answers (the greedy first token) to a POPE-format shapes set written by `shapes.write_pope`:
    eval_pope.py's metrics per split and accuracy per size bucket (`shapes.question_bucket`)."""
    from PIL import Image

    data_dir = Path(data_dir)
    scenes = shapes.read_annotations(data_dir)
    rows = {split: [json.loads(line) for line in open(data_dir / f"coco_pope_{split}.json")]
            for split in shapes.SPLITS}
    unique: dict[str, dict[str, bool]] = {}  # image -> class -> label; positives repeat across splits
    for split_rows in rows.values():
        for r in split_rows:
            unique.setdefault(r["image"], {})[_class_of(r["text"])] = r["label"] == "yes"
    cfg = model.config
    layout = PackedLayout.build(build_tokenizer(), cfg, max(len(q) for q in unique.values()))
    graphdef, state = nnx.split(model)
    answer = answer_fn(graphdef, layout)
    said_yes: dict[tuple[str, str], bool] = {}
    no_id = layout.answer_ids[1]
    images = sorted(unique)
    for start in range(0, len(images), batch_size):
        chunk = images[start:start + batch_size]
        questions = [[(*n.split(), label) for n, label in unique[name].items()] for name in chunk]
        pixels = np.stack([preprocess_image(Image.open(data_dir / "val2014" / name).convert("RGB"),
                                            image_size=cfg.vision.image_size) for name in chunk])
        first = np.asarray(answer(state, layout.pack(questions)["input_ids"], pixels))
        for row, name in enumerate(chunk):
            for j, (c, s, _) in enumerate(questions[row]):
                said_yes[(name, f"{c} {s}")] = int(first[row, j]) != no_id  # eval_pope: anything but "No" is yes
    out = {"splits": {}, "buckets": {}}
    all_correct, all_buckets = [], []
    for split, split_rows in rows.items():
        preds, labels, buckets = [], [], []
        for r in split_rows:
            name = _class_of(r["text"])
            preds.append("yes" if said_yes[(r["image"], name)] else "no")
            labels.append(r["label"])
            objects = [(o.name, o.size) for o in scenes[r["image"]].objects]
            buckets.append(shapes.question_bucket(objects, name))
        correct = [p == l for p, l in zip(preds, labels)]
        out["splits"][split] = confusion_metrics(preds, labels)
        out["buckets"][split] = accuracy_by_bucket(np.asarray(correct), np.asarray(buckets), prefix=split)
        all_correct += correct
        all_buckets += buckets
    out["buckets"]["all"] = accuracy_by_bucket(np.asarray(all_correct), np.asarray(all_buckets), prefix="all")
    return out


ZOOM_VIEWS = ("full", "zoom", "upsampled", "teacher")


@dataclasses.dataclass(frozen=True)
class ZoomAnswers:
    """Each distinct POPE question with an object to zoom on, answered from each view (`evaluate_zoom`)."""
    questions: list[tuple[str, str, bool]]  # (image, class, label is yes), sorted
    buckets: np.ndarray  # [Q] the question's size bucket (`shapes.question_bucket`)
    kinds: np.ndarray  # [Q] "yes", "same colour" or "same shape" (`shapes.question_kind`)
    correct: dict[str, np.ndarray]  # view -> [Q] bool
    colour_in_view: dict[str, np.ndarray]  # view -> [Q] bool: a shape of the asked colour is (partly) in view
    zoom_offsets: np.ndarray | None  # [Q] the zoomed-on object's `shapes.patch_offset` in the "zoom" view
    checked: np.ndarray  # [Q] bool: the zoomed-on object is drawn as a fine check (`shapes.World.checked`)


def zoom_answers(model: LlavaModel, data_dir: str | os.PathLike, *, region_size: int = 3, context: float = 2.0,
                 views: Sequence[str] = ZOOM_VIEWS, batch_size: int = 32,
                 progress: Callable[[int], None] = lambda n: None) -> ZoomAnswers:
    """Every distinct POPE question (image, class) of a shapes set answered from
      full       the full scene;
      zoom       the crop of the right region (`shapes.crop_view`: the r x r region holding the object asked
                 about, or for an absent class the look-alike `shapes.question_bucket` names, grown by
                 `context`, cut from the original), as the crop mode's pass 2 sees it with crop_input="crop";
      upsampled  the same box cut from the model's input instead (`shapes.upsampled_view`): magnified, no new
                 pixels;
      teacher    the region alone upsampled from the model's input, as TokenSR's teacher sees it (BLINK.md §5).
    Questions with no object to zoom on ("none") are left out. `progress(n)` after each batch of n questions."""
    from PIL import Image

    unknown = [v for v in views if v not in ZOOM_VIEWS]
    if unknown:
        raise ValueError(f"view {unknown[0]!r} is unknown; use any of {', '.join(ZOOM_VIEWS)}")
    data_dir = Path(data_dir)
    scenes = shapes.read_annotations(data_dir)
    world = shapes.read_world(data_dir)
    labels: dict[tuple[str, str], bool] = {}
    for split in shapes.SPLITS:
        for line in open(data_dir / f"coco_pope_{split}.json"):
            r = json.loads(line)
            labels[(r["image"], _class_of(r["text"]))] = r["label"] == "yes"
    cfg = model.config
    layout = PackedLayout.build(build_tokenizer(), cfg, 1)
    graphdef, state = nnx.split(model)
    answer = answer_fn(graphdef, layout)
    no_id = layout.answer_ids[1]
    items, buckets, kinds = [], [], []
    for (image, name), label in sorted(labels.items()):
        objects = scenes[image].objects
        found = shapes.question_target([(o.name, o.size, o) for o in objects], name)
        if found is None:
            continue  # nothing to zoom on
        target = found[2]
        items.append((image, name, label, shapes.region_of(target.cx, target.cy, region_size, scenes[image].size),
                      target))
        buckets.append(target.bucket)
        kinds.append(shapes.question_kind([(o.name, o.size) for o in objects], name))

    def show(scene: shapes.Scene, region: int, image) -> dict[str, shapes.View]:
        crop = (shapes.crop_view(scene, region, region_size, context, image)
                if {"zoom", "upsampled"} & set(views) else None)
        make = {"full": lambda: shapes.full_view(scene, image), "zoom": lambda: crop,
                "upsampled": lambda: shapes.upsampled_view(scene, crop.box, image),
                "teacher": lambda: shapes.teacher_view(scene, region, region_size, image)}
        return {view: make[view]() for view in views}

    correct = {view: [] for view in views}
    coloured = {view: [] for view in views}
    offsets = []  # where the zoomed-on object lands on the crop's patch grid, if "zoom" is a view
    for start in range(0, len(items), batch_size):
        chunk = items[start:start + batch_size]
        shown = [show(scenes[image], region, Image.open(data_dir / "val2014" / image).convert("RGB"))
                 for image, _, _, region, _ in chunk]
        ids = layout.pack([[(*name.split(), label)] for _, name, label, _, _ in chunk])["input_ids"]
        if "zoom" in views:
            offsets += [shapes.patch_offset(*shapes.view_point(scenes[c[0]], s["zoom"].box, c[4].cx, c[4].cy))
                        for s, c in zip(shown, chunk)]
        for view in views:
            pixels = np.stack([preprocess_image(s[view].resized(cfg.vision.image_size).image,
                                                image_size=cfg.vision.image_size) for s in shown])
            said_yes = np.asarray(answer(state, ids, pixels))[:, 0] != no_id
            correct[view] += [bool(y) == c[2] for y, c in zip(said_yes, chunk)]
            coloured[view] += [c[1].split()[0] in {n.split()[0] for n in s[view].present | s[view].ambiguous}
                               for s, c in zip(shown, chunk)]
        progress(len(chunk))
    return ZoomAnswers([(image, name, label) for image, name, label, _, _ in items], np.asarray(buckets),
                       np.asarray(kinds), {view: np.asarray(c, dtype=bool) for view, c in correct.items()},
                       {view: np.asarray(c, dtype=bool) for view, c in coloured.items()},
                       np.asarray(offsets, np.float32) if "zoom" in views else None,
                       np.array([world.is_check(t.colour) for *_, t in items], dtype=bool))


def evaluate_zoom(model: LlavaModel, data_dir: str | os.PathLike, *, region_size: int = 3, context: float = 2.0,
                  batch_size: int = 32) -> dict:
    """Does zooming help this backbone, and is it the pixels or the magnification? `zoom_answers`' four views.
    -> {view: accuracy per size bucket}; `python -m train.demo.zoom` adds other geometries and paired intervals."""
    answers = zoom_answers(model, data_dir, region_size=region_size, context=context, batch_size=batch_size)
    return {view: accuracy_by_bucket(c, answers.buckets, prefix=view) for view, c in answers.correct.items()}
