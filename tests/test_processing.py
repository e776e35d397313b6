"""Processing against the real thing: transformers' CLIP image processor (PIL backend), a literal numpy
expand2square, the BLINK.md prompt literal, and the tiny word-level tokenizer."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image
from transformers import CLIPImageProcessorPil

from blink_jax.config import LlavaConfig
from blink_jax.processing import (
    ImageError,
    Processor,
    ProcessorError,
    build_prompt,
    load_image,
    preprocess_image,
    preprocess_images,
    preprocess_uint8,
    tokenize_with_image,
)
from tiny_llava import make_tokenizer, photo, save_hf_model, tiny_hf_config

# Odd sizes: 500x371 needs truncation (not rounding) of the long side at 336; 40x29 is upscaled.
SIZES = [(97, 61), (61, 97), (336, 336), (500, 371), (40, 29)]
LLAVA_PAD = (122, 116, 104)  # int(255 * CLIP mean), the original LLaVA eval's pad colour


def hf_clip(img: Image.Image, size: int) -> np.ndarray:
    """transformers' CLIP preprocessing (the PIL backend `CLIPImageProcessor` falls back to) -> [3, S, S]."""
    proc = CLIPImageProcessorPil(size={"shortest_edge": size}, crop_size={"height": size, "width": size},
                                 do_convert_rgb=True)
    return np.asarray(proc(images=[img], return_tensors="np")["pixel_values"][0])


def numpy_expand2square(img: Image.Image, background) -> Image.Image:
    """LLaVA's expand2square, written out with numpy."""
    pixels = np.asarray(img)
    height, width = pixels.shape[:2]
    side = max(height, width)
    canvas = np.empty((side, side, 3), np.uint8)
    canvas[:] = background
    top, left = (side - height) // 2, (side - width) // 2
    canvas[top:top + height, left:left + width] = pixels
    return Image.fromarray(canvas)


@pytest.mark.parametrize("size", [336, 56])
@pytest.mark.parametrize("width,height", SIZES)
def test_clip_matches_transformers(width, height, size):
    img = photo(width, height, seed=width + height)
    ours = preprocess_image(img, image_size=size, pad_to_square=False)
    assert ours.shape == (3, size, size) and ours.dtype == np.float32
    np.testing.assert_allclose(ours, hf_clip(img, size), rtol=0, atol=1e-5)


@pytest.mark.parametrize("size", [336, 56])
@pytest.mark.parametrize("width,height", SIZES)
def test_pad_to_square_matches_literal_expand2square(width, height, size):
    img = photo(width, height, seed=3 * width + height)
    ours = preprocess_image(img, image_size=size, pad_to_square=True)
    np.testing.assert_allclose(ours, hf_clip(numpy_expand2square(img, LLAVA_PAD), size), rtol=0, atol=1e-5)


@pytest.mark.parametrize("pad_to_square", [False, True])
@pytest.mark.parametrize("width,height", SIZES)
def test_uint8_stage_is_the_image_transformers_normalises(width, height, pad_to_square):
    """The image before normalisation (what training crops and reports draw on) is transformers' resize and
    crop, with rescaling and normalisation switched off."""
    img = photo(width, height, seed=5 * width + height)
    ours = preprocess_uint8(img, image_size=56, pad_to_square=pad_to_square)
    assert ours.shape == (56, 56, 3) and ours.dtype == np.uint8
    proc = CLIPImageProcessorPil(size={"shortest_edge": 56}, crop_size={"height": 56, "width": 56},
                                 do_convert_rgb=True, do_rescale=False, do_normalize=False)
    source = numpy_expand2square(img, LLAVA_PAD) if pad_to_square else img
    want = np.asarray(proc(images=[source], return_tensors="np")["pixel_values"][0]).transpose(1, 2, 0)
    np.testing.assert_array_equal(ours, want)


def test_preprocess_images_stacks():
    imgs = [photo(97, 61, seed=1), photo(61, 97, seed=2)]
    batch = preprocess_images(imgs, image_size=56)
    assert batch.shape == (2, 3, 56, 56)
    np.testing.assert_array_equal(batch[1], preprocess_image(imgs[1], image_size=56))


def test_load_image_returns_rgb(tmp_path):
    path = tmp_path / "grey.png"
    photo(31, 17).convert("L").save(path)
    img = load_image(path)
    assert img.mode == "RGB" and img.size == (31, 17)


def _truncated_jpeg(path):
    photo(97, 61).save(path, quality=90)
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])


@pytest.mark.parametrize("make", [
    lambda p: None,                                       # missing
    lambda p: p.write_text("not an image, just text\n"),  # text named .jpg
    _truncated_jpeg,                                      # real JPEG, cut in half
], ids=["missing", "text", "truncated"])
def test_load_image_errors_name_the_file(tmp_path, make):
    path = tmp_path / "broken_picture.jpg"
    make(path)
    with pytest.raises(ImageError, match="broken_picture.jpg"):
        load_image(path)


def test_prompt_is_the_blink_md_literal():
    expected = ("A chat between a curious user and an artificial intelligence assistant. The assistant gives "
                "helpful, detailed, and polite answers to the user's questions. USER: <image>\nIs there a cat?\n"
                "Answer the question using a single word or phrase. ASSISTANT:")
    assert build_prompt("Is there a cat?") == expected
    assert build_prompt("Is there a cat?", suffix=None) == expected.replace(
        "\nAnswer the question using a single word or phrase.", "")


def test_tokenize_with_image(tmp_path):
    tok = make_tokenizer(tmp_path)
    before, after = "a chat between user and assistant USER: ", "\nis there a cat ? ASSISTANT:"
    ids = tokenize_with_image(tok, before + "<image>" + after, image_token_index=7, num_image_tokens=5)

    def words(text):
        return tok(text, add_special_tokens=False).input_ids

    assert ids == [tok.bos_token_id] + words(before) + [7] * 5 + words(after)
    assert ids.count(tok.bos_token_id) == 1


@pytest.mark.parametrize("prompt", ["no image here", "<image> one <image> two"])
def test_tokenize_needs_exactly_one_image(tmp_path, prompt):
    tok = make_tokenizer(tmp_path)
    with pytest.raises(ValueError, match="<image>") as err:
        tokenize_with_image(tok, prompt, image_token_index=4, num_image_tokens=16)
    assert prompt in str(err.value)


@pytest.fixture(scope="module")
def tiny_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("tiny_llava")
    save_hf_model(path)
    return path


def test_processor_batch(tiny_dir, tmp_path):
    proc = Processor.from_pretrained(tiny_dir)
    cfg = proc.config
    assert cfg.num_image_tokens == 16 and cfg.image_token_index == 4
    prompts = [build_prompt("is there a cat ?"), build_prompt("how many red circle or green square in image ?")]
    img_path = tmp_path / "second.png"
    photo(61, 97, seed=5).save(img_path)
    images = [photo(97, 61, seed=4), str(img_path)]
    out = proc(prompts, images)

    ids, mask, pixels = out["input_ids"], out["attention_mask"], out["pixel_values"]
    assert ids.dtype == mask.dtype == np.int32 and pixels.dtype == np.float32
    lengths = [len(proc.tokenize(p)) for p in prompts]
    assert lengths[0] < lengths[1] and ids.shape == mask.shape == (2, lengths[1])
    pad = lengths[1] - lengths[0]
    np.testing.assert_array_equal(mask[0], [0] * pad + [1] * lengths[0])
    np.testing.assert_array_equal(mask[1], 1)
    np.testing.assert_array_equal(ids[0, :pad], proc.tokenizer.pad_token_id)
    for row, prompt in enumerate(prompts):
        assert ids[row][mask[row] == 1].tolist() == proc.tokenize(prompt)
        assert (ids[row] == cfg.image_token_index).sum() == 16
    assert pixels.shape == (2, 3, 56, 56)
    np.testing.assert_array_equal(pixels[1], preprocess_image(load_image(img_path), image_size=56))
    assert proc.decode(ids[0]).endswith("USER : is there a cat ? the question using a single word or phrase . ASSISTANT :")


def test_processor_errors(tiny_dir, tmp_path):
    proc = Processor.from_pretrained(tiny_dir, config=LlavaConfig.from_hf_config(tiny_hf_config()))
    with pytest.raises(ProcessorError, match="2 prompts and 1 images"):
        proc([build_prompt("a"), build_prompt("b")], [photo(20, 20)])
    tiny_hf_config().save_pretrained(tmp_path)  # config.json but no tokenizer
    with pytest.raises(ProcessorError, match=str(tmp_path)):
        Processor.from_pretrained(tmp_path)
