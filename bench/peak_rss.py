"""Runs the HF -> orbax converter's command line (or a run of it that converts nothing) and prints its peak RSS.

    python bench/peak_rss.py convert --hf-dir HF --out OUT [converter options]
    python bench/peak_rss.py baseline HF_DIR

`convert` runs `python -m checkpoints_conversion.hf_to_orbax ARGS` as a child and reports the child's peak resident
set (`ru_maxrss` of the waited-for children). `baseline` runs the same command line, with orbax imported first (the
converter imports it only when it writes), into an output directory that already holds a file: the converter
validates everything (config, key set, shapes, file headers, output directory) before it reads a tensor, so it
imports its modules, reads the config, traces the parameter shapes, refuses the directory and converts nothing:
the interpreter's baseline that `bench.conversion` subtracts. The converter is imported from PYTHONPATH and the
working directory, so another source tree's converter can be measured (`bench.conversion --compare-with`).
"""

from __future__ import annotations

import resource
import subprocess
import sys
import tempfile
from pathlib import Path

CONVERTER = "checkpoints_conversion.hf_to_orbax"
# What `python -m CONVERTER` does, after importing orbax; sys.argv[1:] are the converter's arguments.
WITH_ORBAX = f"import runpy, orbax.checkpoint; runpy.run_module({CONVERTER!r}, run_name='__main__', alter_sys=True)"
EXIT_REFUSED = 2  # the converter's exit status for inputs it refuses, after "nothing was written"


def children_peak_rss_bytes() -> int:
    return resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss * 1024  # KiB on Linux


def baseline(hf_dir: str) -> int:
    """Runs the converter into an occupied output directory; -> 0 if it refused it as expected, else 1."""
    with tempfile.TemporaryDirectory(prefix="peak_rss_baseline_") as out:
        (Path(out) / "occupied").write_text("the baseline run must refuse this directory\n")
        proc = subprocess.run([sys.executable, "-c", WITH_ORBAX, "--hf-dir", hf_dir, "--out", out, "--no-progress"],
                              capture_output=True, text=True)
    if proc.returncode != EXIT_REFUSED or "is not empty" not in proc.stderr:
        print(f"baseline: the converter was to refuse the non-empty --out after validating {hf_dir}, but it exited "
              f"{proc.returncode}:\n{proc.stderr[-3000:]}\nupdate bench/peak_rss.py's baseline to the converter",
              file=sys.stderr)
        return 1
    return 0


def main(argv=None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if not argv or argv[0] not in ("convert", "baseline") or (argv[0] == "baseline" and len(argv) != 2):
        print(__doc__, file=sys.stderr)
        return 2
    if argv[0] == "convert":
        code = subprocess.run([sys.executable, "-m", CONVERTER, *argv[1:]]).returncode
    else:
        code = baseline(argv[1])
    print(f"peak_rss_bytes={children_peak_rss_bytes()}")
    return code


if __name__ == "__main__":
    sys.exit(main())
