"""The Blink mechanics: config, saliency-guided scanning, dynamic token resolution, TokenSR."""

from blink_jax.blink.config import (
    ABLATIONS,
    HIGH_TAU_EXP,
    PRESETS,
    BlinkConfig,
    BlinkPreset,
    BlinkStatic,
    Thresholds,
)
from blink_jax.blink.crop import CROP_INPUTS, CropConfig, CropResult, crop_box, crop_generate
from blink_jax.blink.dtr import (
    ACTION_NAMES,
    DROP,
    EXPAND,
    KEEP,
    NO_REGION,
    NONE,
    DTRState,
    action_names,
    decide,
    gather_region,
    gather_visual,
    init_state,
    random_regions,
    region_box,
    region_origin,
    select_on_expand,
    sr_position_ids,
    sr_source_index,
    step,
)
from blink_jax.blink.saliency import (
    last_token_attention,
    region_scores,
    saliency_guided_scan,
    saliency_ratio,
    visual_saliency,
)
from blink_jax.blink.tokensr import TokenSR, TokenSRBank, bilinear_upsample, check_geometry, check_state

__all__ = [
    "ABLATIONS", "HIGH_TAU_EXP", "PRESETS", "BlinkConfig", "BlinkPreset", "BlinkStatic", "Thresholds",
    "CROP_INPUTS", "CropConfig", "CropResult", "crop_box", "crop_generate",
    "ACTION_NAMES", "DROP", "EXPAND", "KEEP", "NO_REGION", "NONE", "DTRState", "action_names", "decide",
    "gather_region", "gather_visual", "init_state", "random_regions", "region_box", "region_origin", "select_on_expand",
    "sr_position_ids", "sr_source_index", "step",
    "last_token_attention", "region_scores", "saliency_guided_scan", "saliency_ratio", "visual_saliency",
    "TokenSR", "TokenSRBank", "bilinear_upsample", "check_geometry", "check_state",
]
