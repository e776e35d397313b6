"""blink-jax: Blink (dynamic visual token resolution) on LLaVA-1.5, in JAX/Flax NNX."""

from blink_jax.config import ConfigError, LlavaConfig, TextConfig, VisionConfig
from blink_jax.loading import load_pretrained
from blink_jax.runtime import InputError, Llava, ModelOutput, generate
from blink_jax.weights.params import CheckpointError

__all__ = [
    "CheckpointError", "ConfigError", "InputError", "Llava", "LlavaConfig", "ModelOutput", "TextConfig",
    "VisionConfig", "generate", "load_pretrained",
]
