"""Qwen2.5-VL (transformers' `Qwen2_5_VLForConditionalGeneration`) in Flax NNX: config, vision tower, Qwen2
decoder with M-RoPE, forward passes, preprocessing and the HF checkpoint key map.

    cfg, model = load_pretrained(model_dir)
    batch = QwenProcessor.from_pretrained(model_dir)(questions, images)
    inputs = prepare_inputs(cfg, batch["input_ids"], batch["attention_mask"], batch["pixel_values"],
                            batch["image_grid_thw"])
    tokens = generate(model, inputs, max_new_tokens=16, eos_token_id=cfg.text.eos_token_id,
                      pad_token_id=cfg.text.pad_token_id)

Blink (BLINK.md §10) through the jitted runtime, on batches whose images share one grid shape:

    processor = QwenProcessor.from_pretrained(model_dir, grid_shapes=grid_buckets(max_pixels, 28, multiple=r))
    batch = processor(questions, images)  # images grouped by processor.grid_of(image)
    tokens = Qwen(model).generate(**batch, max_new_tokens=16, blink=BlinkConfig(layers=..., region_size=r))
"""

from blink_jax.model.qwen2_5_vl.config import Qwen25VLConfig, QwenTextConfig, QwenVisionConfig
from blink_jax.model.qwen2_5_vl.forward import QwenInputs, generate, prefill, prepare_inputs
from blink_jax.model.qwen2_5_vl.loading import load_pretrained
from blink_jax.model.qwen2_5_vl.model import Qwen25VLModel
from blink_jax.model.qwen2_5_vl.processing import QwenProcessor, grid_buckets
from blink_jax.model.qwen2_5_vl.runtime import Qwen

__all__ = ["Qwen25VLConfig", "QwenTextConfig", "QwenVisionConfig", "QwenInputs", "generate", "prefill",
           "prepare_inputs", "load_pretrained", "Qwen25VLModel", "QwenProcessor", "Qwen", "grid_buckets"]
