"""Qwen2.5-VL (transformers' `Qwen2_5_VLForConditionalGeneration`) in Flax NNX: config, vision tower, Qwen2
decoder with M-RoPE, forward passes, preprocessing and the HF checkpoint key map."""
