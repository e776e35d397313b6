"""The Flax Qwen2.5-VL port against transformers' PyTorch `Qwen2_5_VLForConditionalGeneration`, its
`Qwen2VLImageProcessor` (PIL backend) and `Qwen2_5_VLProcessor`, on tiny random models saved with
`save_pretrained` and loaded through our safetensors loader."""

from __future__ import annotations

import shutil

import jax
import numpy as np
import pytest
import torch
from flax import nnx

from blink_jax.weights.params import CheckpointError
from blink_jax.model.qwen2_5_vl import forward as qf
from blink_jax.model.qwen2_5_vl.config import Qwen25VLConfig
from blink_jax.model.qwen2_5_vl.loading import hf_tensors, load_pretrained
from blink_jax.model.qwen2_5_vl.processing import ImageProcessorConfig, QwenProcessor, preprocess_images
from tiny_llava import photo

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>", "<|vision_start|>", "<|vision_end|>", "<|image_pad|>",
            "<|video_pad|>", "<unk>"]
WORDS = ("system You are a helpful assistant user is there cat dog in the image what colour of circle how many "
         "left right red green blue yes no one two three . ? ,").split()
# Qwen2-VL's chat template as the released checkpoints ship it.
CHAT_TEMPLATE = (
    "{% set image_count = namespace(value=0) %}{% set video_count = namespace(value=0) %}{% for message in messages %}"
    "{% if loop.first and message['role'] != 'system' %}<|im_start|>system\nYou are a helpful assistant.<|im_end|>\n"
    "{% endif %}<|im_start|>{{ message['role'] }}\n{% if message['content'] is string %}{{ message['content'] }}"
    "<|im_end|>\n{% else %}{% for content in message['content'] %}{% if content['type'] == 'image' or 'image' in "
    "content or 'image_url' in content %}{% set image_count.value = image_count.value + 1 %}{% if add_vision_id %}"
    "Picture {{ image_count.value }}: {% endif %}<|vision_start|><|image_pad|><|vision_end|>{% elif content['type'] "
    "== 'video' or 'video' in content %}{% set video_count.value = video_count.value + 1 %}{% if add_vision_id %}"
    "Video {{ video_count.value }}: {% endif %}<|vision_start|><|video_pad|><|vision_end|>{% elif 'text' in content "
    "%}{{ content['text'] }}{% endif %}{% endfor %}<|im_end|>\n{% endif %}{% endfor %}{% if add_generation_prompt %}"
    "<|im_start|>assistant\n{% endif %}")
VOCAB = {tok: i for i, tok in enumerate(SPECIALS + list(dict.fromkeys(WORDS)))}
IMAGE_CFG = dict(min_pixels=56 * 56, max_pixels=28 * 28 * 40)

CONFIGS = {
    # Window attention (2x2-cell windows) around one full-attention block; GQA 5 query heads over 1 kv head.
    "window": dict(
        text=dict(hidden_size=60, intermediate_size=47, num_hidden_layers=3, num_attention_heads=5,
                  num_key_value_heads=1, rope_parameters={"rope_type": "default", "rope_theta": 500.0,
                                                          "mrope_section": [2, 2, 2]}),
        vision=dict(depth=3, hidden_size=60, intermediate_size=47, num_heads=5, out_hidden_size=60, window_size=56,
                    fullatt_block_indexes=[1]),
        top=dict(tie_word_embeddings=False)),
    # 3x3-cell windows (partial at the edges), full attention first; 9 query heads over 3 kv heads; tied head.
    "tied": dict(
        text=dict(hidden_size=72, intermediate_size=53, num_hidden_layers=2, num_attention_heads=9,
                  num_key_value_heads=3, rope_parameters={"rope_type": "default", "rope_theta": 800.0,
                                                          "mrope_section": [1, 2, 1]}),
        vision=dict(depth=2, hidden_size=48, intermediate_size=37, num_heads=3, out_hidden_size=72, window_size=84,
                    fullatt_block_indexes=[0]),
        top=dict(tie_word_embeddings=True)),
}
# Photos (width, height): smart resize rounds them to 168x112 (6x4 merged cells) and 84x140 (3x5).
PHOTOS = [(170, 110), (80, 146)]
QUESTIONS = ["is there a cat in the image ?", "what colour is the circle ?"]


def make_tokenizer(out_dir):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.WordLevel(vocab=VOCAB, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   unk_token="<unk>", additional_special_tokens=SPECIALS[1:7])
    fast.padding_side = "left"
    fast.chat_template = CHAT_TEMPLATE
    fast.save_pretrained(str(out_dir))
    return fast


def make_hf_model(name: str, seed: int = 0, weight_scale: float = 0.2, spec: dict | None = None):
    """A random transformers model of `CONFIGS[name]`, or of `spec` (same form) when given."""
    from transformers import Qwen2_5_VLConfig, Qwen2_5_VLForConditionalGeneration

    spec = CONFIGS[name] if spec is None else spec
    text = dict(spec["text"], vocab_size=len(VOCAB) + 5, rms_norm_eps=1e-6, max_position_embeddings=512,
                bos_token_id=None, eos_token_id=VOCAB["<|im_end|>"], pad_token_id=VOCAB["<|endoftext|>"])
    cfg = Qwen2_5_VLConfig(text_config=text, vision_config=dict(spec["vision"]), image_token_id=VOCAB["<|image_pad|>"],
                           video_token_id=VOCAB["<|video_pad|>"], vision_start_token_id=VOCAB["<|vision_start|>"],
                           vision_end_token_id=VOCAB["<|vision_end|>"], **spec["top"])
    cfg._attn_implementation = "eager"
    torch.manual_seed(seed)
    model = Qwen2_5_VLForConditionalGeneration(cfg).eval()
    gen = torch.Generator().manual_seed(seed + 1)
    with torch.no_grad():
        for pname, p in model.named_parameters():
            # HF initialises norms to ones and biases to zeros: randomise them so their mapping is tested.
            if pname.endswith("bias") or "norm" in pname or "ln_q" in pname:
                p.add_(0.1 * torch.randn(p.shape, generator=gen))
            else:
                p.copy_(torch.randn(p.shape, generator=gen) * weight_scale)
    return model


def save_model_dir(out_dir, name: str, seed: int, spec: dict | None = None):
    from transformers import Qwen2VLImageProcessor

    model = make_hf_model(name, seed=seed, spec=spec)
    model.save_pretrained(str(out_dir))
    make_tokenizer(out_dir)
    Qwen2VLImageProcessor(**IMAGE_CFG).save_pretrained(str(out_dir))
    return model


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    """name -> (model dir, HF model, our config, our model) for each config."""
    out = {}
    for seed, name in enumerate(sorted(CONFIGS)):
        path = tmp_path_factory.mktemp(name)
        hf = save_model_dir(path, name, seed)
        cfg, ours = load_pretrained(path)
        out[name] = (path, hf, cfg, ours)
    return out


def hf_processor(path):
    from transformers import AutoTokenizer, Qwen2_5_VLProcessor, Qwen2VLImageProcessor

    class ImagesOnly(Qwen2_5_VLProcessor):
        """Without torchvision transformers cannot import the video processor's base class to check it."""

        def check_argument_for_proper_class(self, name, arg):
            return None if name == "video_processor" else super().check_argument_for_proper_class(name, arg)

    return ImagesOnly(image_processor=Qwen2VLImageProcessor(**IMAGE_CFG),
                               tokenizer=AutoTokenizer.from_pretrained(str(path)), chat_template=CHAT_TEMPLATE)


def hf_inputs(path, questions=QUESTIONS, sizes=PHOTOS):
    proc = hf_processor(path)
    images = [photo(w, h, seed=i) for i, (w, h) in enumerate(sizes)]
    texts = [proc.apply_chat_template([{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": q}]}],
                                      add_generation_prompt=True, tokenize=False) for q in questions]
    return proc(text=texts, images=images, padding=True, padding_side="left", return_tensors="pt"), images


def run_ours(model, inputs: qf.QwenInputs, fn, **kwargs):
    graphdef, state = nnx.split(model)
    return jax.jit(lambda s, x: fn(nnx.merge(graphdef, s), x, **kwargs))(state, inputs)


def ours_inputs(cfg, batch):
    return qf.prepare_inputs(cfg, batch["input_ids"].numpy(), batch["attention_mask"].numpy(),
                             batch["pixel_values"].numpy(), batch["image_grid_thw"].numpy())


# ------------------------------------------------------------------------------------------------ model


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_logits_equal_transformers(models, name):
    path, hf, cfg, ours = models[name]
    batch, _ = hf_inputs(path)
    mask = batch["attention_mask"].numpy()
    assert mask[0].sum() != mask[1].sum() and (mask == 0).any(), "the batch must be left padded"
    grid = batch["image_grid_thw"].numpy()
    assert (grid[0] != grid[1]).any() and cfg.vision.window_cells < grid[:, 1:].max() // 2
    with torch.no_grad():
        expected = hf(**batch).logits.numpy()
    got = np.asarray(run_ours(ours, ours_inputs(cfg, batch), lambda m, x: qf.prefill(m, x)[0]))
    valid = mask > 0
    np.testing.assert_allclose(got[valid], expected[valid], atol=1e-4, rtol=0)
    assert np.abs(expected[valid]).max() > 0.1, "logits too small for the tolerance to mean anything"


def test_rope_index_equals_transformers(models):
    path, hf, cfg, _ = models["window"]
    batch, _ = hf_inputs(path)
    expected, deltas = hf.model.get_rope_index(batch["input_ids"], batch["mm_token_type_ids"],
                                               image_grid_thw=batch["image_grid_thw"],
                                               attention_mask=batch["attention_mask"])
    inputs = ours_inputs(cfg, batch)
    mask = batch["attention_mask"].numpy() > 0
    np.testing.assert_array_equal(np.asarray(inputs.positions)[:, mask], expected.numpy()[:, mask])
    np.testing.assert_array_equal(np.asarray(inputs.next_position), deltas.numpy()[:, 0] + mask.sum(1))


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_vision_windows_equal_transformers(name):
    """Our attention groups are transformers' windows and frames, as sets of patches."""
    from transformers.vision_utils import get_vision_cu_seqlens, get_vision_window_index

    from blink_jax.model.qwen2_5_vl.vision import vision_layout

    hf_cfg = make_hf_model(name).config
    v = hf_cfg.vision_config
    grid = torch.tensor([[1, 12, 8], [1, 6, 10], [2, 4, 4]])
    layout = vision_layout(grid.numpy(), Qwen25VLConfig.from_hf_config(hf_cfg).vision)
    index, cu = get_vision_window_index(grid, v.spatial_merge_size, v.window_size, v.patch_size)
    unit = v.spatial_merge_size ** 2
    patches = (index[:, None] * unit + torch.arange(unit)).reshape(-1).numpy()
    cu = cu.tolist()
    theirs = {frozenset(patches[a:b].tolist()) for a, b in zip(cu[:-1], cu[1:])}
    p = int(grid.prod(-1).sum())
    ours = lambda groups: {frozenset(g[g < p].tolist()) for g in np.asarray(groups)}
    assert ours(layout.windows) == theirs and len(theirs) > len(grid) + 1
    cu_frames = get_vision_cu_seqlens(grid).tolist()
    assert ours(layout.frames) == {frozenset(range(a, b)) for a, b in zip(cu_frames[:-1], cu_frames[1:])}


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_greedy_generation_equals_transformers(models, name):
    path, hf, cfg, ours = models[name]
    batch, _ = hf_inputs(path)
    with torch.no_grad():  # stops a row at EOS (<|im_end|>) and pads it with <|endoftext|>, as ours
        out = hf.generate(**batch, max_new_tokens=16, do_sample=False)
    expected = out[:, batch["input_ids"].shape[1]:].numpy()
    got = np.asarray(run_ours(ours, ours_inputs(cfg, batch), qf.generate, max_new_tokens=16,
                              eos_token_id=cfg.text.eos_token_id, pad_token_id=cfg.text.pad_token_id))
    np.testing.assert_array_equal(got, expected)
    assert len(set(expected.ravel().tolist())) > 4, "degenerate continuation: the test would prove little"


def test_config_from_json(models):
    path, _, cfg, _ = models["window"]
    assert cfg == Qwen25VLConfig.from_json(path)
    assert cfg.vision.window_cells == 2 and cfg.vision.fullatt_block_indexes == (1,)
    assert cfg.text.mrope_section == (2, 2, 2) and cfg.text.head_dim == 12 and not cfg.text.tie_word_embeddings
    assert models["tied"][2].text.tie_word_embeddings


def test_bad_inputs_name_the_problem(models):
    path, _, cfg, _ = models["window"]
    batch, _ = hf_inputs(path)
    ids, mask = batch["input_ids"].numpy(), batch["attention_mask"].numpy()
    pixels, grid = batch["pixel_values"].numpy(), batch["image_grid_thw"].numpy()
    with pytest.raises(ValueError, match="pad on the left"):
        qf.prepare_inputs(cfg, ids[:, ::-1], mask[:, ::-1], pixels, grid)
    with pytest.raises(ValueError, match=r"pixel_values has shape \(\d+, 1176\), expected"):
        qf.prepare_inputs(cfg, ids, mask, pixels[:-4], grid)
    wrong_order = r"row 0: an image-token run of 24 tokens does not match image 0's grid \(1, 10, 6\)"
    with pytest.raises(ValueError, match=wrong_order):
        qf.prepare_inputs(cfg, ids, mask, pixels, grid[::-1])
    with pytest.raises(ValueError, match="image_grid_thw gives 3 images but the prompts hold 2"):
        qf.prepare_inputs(cfg, ids, mask, np.concatenate([pixels, pixels[:16]]), np.concatenate([grid, [[1, 4, 4]]]))


# ------------------------------------------------------------------------------------------ processing

ASPECTS = [(97, 61), (61, 97), (300, 120), (25, 25), (1000, 700), (90, 90)]


def test_pixel_values_equal_transformers():
    from transformers import Qwen2VLImageProcessor

    hf = Qwen2VLImageProcessor(**IMAGE_CFG)
    ours = ImageProcessorConfig(**IMAGE_CFG)
    images = [photo(w, h, seed=i) for i, (w, h) in enumerate(ASPECTS)]
    expected = hf(images=images, return_tensors="np")
    pixels, grid = preprocess_images(images, ours)
    np.testing.assert_array_equal(grid, expected["image_grid_thw"])
    assert len({tuple(g) for g in grid.tolist()}) == len(ASPECTS)  # resized up, down and kept
    assert pixels.dtype == np.float32
    np.testing.assert_allclose(pixels, expected["pixel_values"], rtol=0, atol=1e-6)


def test_processor_equals_transformers(models):
    path = models["window"][0]
    assert ImageProcessorConfig.from_json(path) == ImageProcessorConfig(**IMAGE_CFG)
    expected, images = hf_inputs(path)
    got = QwenProcessor.from_pretrained(path)(QUESTIONS, images)
    for key in ("input_ids", "attention_mask", "image_grid_thw"):
        np.testing.assert_array_equal(got[key], expected[key].numpy(), err_msg=key)
    np.testing.assert_allclose(got["pixel_values"], expected["pixel_values"].numpy(), rtol=0, atol=1e-6)


# ---------------------------------------------------------------------------------------------- loading


def _rewrite(src, dst, edit):
    from safetensors.numpy import load_file, save_file

    shutil.copytree(src, dst)
    tensors = load_file(str(src / "model.safetensors"))
    edit(tensors)
    save_file(tensors, str(dst / "model.safetensors"), metadata={"format": "pt"})


@pytest.mark.parametrize("case, edit, message", [
    ("missing", lambda t: t.pop("model.layers.1.self_attn.k_proj.bias"),
     r"missing key 'model\.layers\.1\.self_attn\.k_proj\.bias'"),
    ("extra", lambda t: t.__setitem__("visual.blocks.0.attn.qkv.scale", np.ones(3, np.float32)),
     r"unexpected key 'visual\.blocks\.0\.attn\.qkv\.scale'"),
    ("shape", lambda t: t.__setitem__("visual.merger.mlp.0.weight", t["visual.merger.mlp.0.weight"][:, :-1]),
     r"key 'visual\.merger\.mlp\.0\.weight' has shape \(240, 239\), expected \(240, 240\)"),
])
def test_loader_refuses_bad_checkpoints(models, tmp_path, case, edit, message):
    path = models["window"][0]
    _rewrite(path, tmp_path / case, edit)
    with pytest.raises(CheckpointError, match=message):
        load_pretrained(tmp_path / case)


def test_blink_jax_load_pretrained_reads_a_qwen_directory(models):
    """`blink_jax.load_pretrained` tells a Qwen2.5-VL directory by its config's model_type and gives the runnable
    `Qwen`, whose logits are transformers'."""
    import blink_jax
    from blink_jax.model.qwen2_5_vl.runtime import Qwen

    path, hf, _, _ = models["window"]
    model = blink_jax.load_pretrained(path)
    assert isinstance(model, Qwen)
    batch, _ = hf_inputs(path)
    with torch.no_grad():
        expected = hf(**batch).logits.numpy()
    got = np.asarray(model(**{k: batch[k].numpy() for k in ("input_ids", "attention_mask", "pixel_values",
                                                            "image_grid_thw")}).logits)
    valid = batch["attention_mask"].numpy() > 0
    np.testing.assert_allclose(got[valid], expected[valid], atol=1e-4, rtol=0)


def test_state_dict_key_layout_loads(models, tmp_path):
    """transformers' in-memory names (`model.visual.*`, `model.language_model.*`) map to the same parameters."""
    path, _, _, ours = models["window"]

    def to_state_dict_names(tensors):
        for key in list(tensors):
            new = "model." + key if key.startswith("visual.") else key.replace("model.", "model.language_model.", 1)
            tensors[new] = tensors.pop(key)

    _rewrite(path, tmp_path / "renamed", to_state_dict_names)
    _, again = load_pretrained(tmp_path / "renamed")
    a, b = nnx.to_flat_state(nnx.state(ours, nnx.Param)), nnx.to_flat_state(nnx.state(again, nnx.Param))
    for (pa, va), (pb, vb) in zip(a, b):
        assert pa == pb
        np.testing.assert_array_equal(np.asarray(va[...]), np.asarray(vb[...]))


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_round_trip_to_hf_is_bit_exact(models, name):
    """HF file -> ours -> HF keys and tensors: every stored tensor back, bit for bit (the tied head is not stored)."""
    from safetensors.numpy import load_file

    path, _, cfg, ours = models[name]
    stored = load_file(str(path / "model.safetensors"))
    if cfg.text.tie_word_embeddings:
        stored.pop("lm_head.weight", None)
    back = hf_tensors(cfg, ours)
    assert sorted(back) == sorted(stored)
    for key, value in stored.items():
        np.testing.assert_array_equal(back[key], value, err_msg=key)
