"""Export a converted directory back to a Hugging Face LLaVA directory (`blink_jax.weights.hf_writer.export`).

    python -m checkpoints_conversion.orbax_to_hf --converted llava-7b-jax --out llava-7b-hf-again
"""

from __future__ import annotations

import argparse
import sys

from blink_jax.weights.hf_writer import export
from blink_jax.weights.params import CheckpointError


def main(argv=None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m checkpoints_conversion.orbax_to_hf",
        description="Export a blink-jax converted directory back to a Hugging Face LLaVA directory "
                    "(model.safetensors in the transformers-5 key layout, config and tokenizer files), "
                    "loadable with transformers.LlavaForConditionalGeneration.from_pretrained.")
    p.add_argument("--converted", required=True, help="directory written by checkpoints_conversion.hf_to_orbax")
    p.add_argument("--out", required=True, help="output directory; must not exist or be empty (see --overwrite)")
    p.add_argument("--overwrite", action="store_true", help="replace --out if it already holds files")
    args = p.parse_args(argv)
    try:
        out = export(args.converted, args.out, overwrite=args.overwrite)
    except (CheckpointError, FileExistsError, ValueError) as e:
        print(f"error: {e}\nnothing was written to '{args.out}'", file=sys.stderr)
        return 2
    print(f"wrote {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
