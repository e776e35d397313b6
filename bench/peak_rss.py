"""Runs the HF -> orbax converter (or only its imports and setup) and prints this process's peak RSS.

    python bench/peak_rss.py convert --hf-dir HF --out OUT [converter options]
    python bench/peak_rss.py baseline HF_DIR

`baseline` imports what the converter imports, reads the config and traces the parameter shapes, and
converts nothing: the interpreter's baseline that `bench.conversion` subtracts. The converter is imported from
PYTHONPATH, so another source tree's converter can be measured (`bench.conversion --compare-with`).
"""

from __future__ import annotations

import resource
import sys


def peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # KiB on Linux


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in ("convert", "baseline"):
        print(__doc__, file=sys.stderr)
        return 2
    import orbax.checkpoint  # noqa: F401  (the converter imports it lazily: the baseline includes it)

    from blink_jax.weights.params import param_shapes
    from checkpoints_conversion import hf_to_orbax
    if argv[0] == "convert":
        code = hf_to_orbax.main(argv[1:])
    else:
        from blink_jax.config import LlavaConfig
        param_shapes(LlavaConfig.from_json(argv[1]))
        code = 0
    print(f"peak_rss_bytes={peak_rss_bytes()}")
    return code


if __name__ == "__main__":
    sys.exit(main())
