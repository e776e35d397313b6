"""Export a converted directory back to a Hugging Face LLaVA or Qwen2.5-VL directory
(`blink_jax.weights.hf_writer.export`, the family from the directory's config.json).

    python -m checkpoints_conversion.orbax_to_hf --converted llava-7b-jax --out llava-7b-hf-again
"""

from __future__ import annotations

import argparse
import sys

from blink_jax.config import ConfigError
from blink_jax.families import family_of
from blink_jax.weights.hf_writer import export
from blink_jax.weights.params import CheckpointError


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m checkpoints_conversion.orbax_to_hf",
        description="Export a blink-jax converted directory back to a Hugging Face LLaVA or Qwen2.5-VL directory "
                    "(model.safetensors in the transformers-5 key layout, config, tokenizer and processor files), "
                    "loadable with transformers' LlavaForConditionalGeneration / "
                    "Qwen2_5_VLForConditionalGeneration.from_pretrained.")
    p.add_argument("--converted", required=True, help="directory written by checkpoints_conversion.hf_to_orbax")
    p.add_argument("--out", required=True, help="output directory; must not exist or be empty (see --overwrite)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it already holds files")
    args = p.parse_args(argv)
    try:
        out = export(args.converted, args.out, overwrite=args.overwrite, family=family_of(args.converted))
    except (CheckpointError, ConfigError, FileExistsError, ValueError) as e:
        print(f"error: {e}\nnothing was written to '{args.out}'", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
