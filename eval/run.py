"""Run a benchmark in vanilla / Blink-interp / Blink / crop mode and print them beside the paper's numbers.

    python -m eval.run --bench pope --model DIR --data-dir DIR --modes vanilla,interp,blink --tokensr DIR \\
        [--ablation random|fixed|no-drop|high-tau] [--limit N] [--batch-size B] [--out DIR] [--save-traces]
        [--modes ...,crop --crop-layer L --crop-context 2.0 --crop-input both|crop]

With no --model, `--bench pope` runs the bundled demo (`eval.demo`): a small LLaVA-1.5 trained on drawn shapes,
its trained TokenSR and a POPE-format shapes set, four modes (vanilla, the two-pass crop baseline with the crop
alone, Blink-interp, Blink), in a few minutes on a CPU.

Writes to --out: samples_<bench>_<mode>.jsonl, results.json, results.md (and traces_<bench>_<mode>.jsonl with
--save-traces). Rerunning the same command resumes a killed run. The work is in `eval.harness.runner`.
"""

from __future__ import annotations

import argparse
import os
import sys

import jax

from blink_jax import distributed, sharding
from eval.benchmarks import NAMES
from eval.harness.flags import positive_int

NO_MODEL = """\
eval.run needs LLaVA-1.5 weights: pass --model DIR, a Hugging Face LLaVA directory (e.g. a download of
llava-hf/llava-1.5-7b-hf) or one converted for blink-jax:

    python -m checkpoints_conversion.hf_to_orbax --hf-dir HF_DIR --out CONVERTED_DIR
    python -m eval.run --bench {bench} --model CONVERTED_DIR --data-dir DATA_DIR
"""

EXIT_USAGE = 2


def parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m eval.run", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--bench", required=True, choices=NAMES, help="the benchmark")
    p.add_argument("--model", help="LLaVA-1.5 directory (Hugging Face or converted) or Hub id, or a Hugging Face "
                                   "Qwen2.5-VL directory; default: the bundled demo model (pope only)")
    p.add_argument("--data-dir", help="the benchmark's release files, in their official layout (default with the "
                                      "demo model: its shapes set)")
    p.add_argument("--modes", default=None,
                   help="comma-separated vanilla,interp,blink,crop (default: vanilla,interp,blink with --tokensr, else "
                        "vanilla,interp; the demo: vanilla,crop,interp,blink; crop is the two-pass baseline of "
                        "BLINK.md §9)")
    p.add_argument("--tokensr", help="trained TokenSR directory (needed by mode blink)")
    p.add_argument("--ablation", choices=("random", "fixed", "no-drop", "high-tau"),
                   help="a BLINK.md §6 ablation, applied to interp and blink")
    p.add_argument("--limit", type=int, help="at most N questions per split/subtask")
    p.add_argument("--batch-size", type=int, help="questions per forward (default 8; demo 16)")
    p.add_argument("--bucket", type=int, default=64, help="prompt lengths are padded to a multiple of this")
    p.add_argument("--max-new-tokens", type=positive_int, help="default: the benchmark's (16 for short answers)")
    p.add_argument("--out", help="output directory (default: eval_out/<bench>; demo eval_out/pope_demo)")
    p.add_argument("--layers", help="Blink's participating layers, e.g. 12-18 (mode interp only: mode blink runs the "
                   "layers its TokenSR was trained for)")
    p.add_argument("--region-size", type=int, help="Blink's region side r (mode interp only, as --layers)")
    p.add_argument("--tau-exp", type=float, help="expansion threshold (interp and blink)")
    p.add_argument("--tau-drop", type=float, help="drop threshold (interp and blink)")
    p.add_argument("--crop-layer", type=int, help="mode crop: pass 1 stops after this layer and crops its most "
                   "attended region (default: the middle of Blink's layers, those of --tokensr or --layers)")
    p.add_argument("--crop-context", type=float, help="mode crop: the region's box grown about its centre by this "
                   "factor (default 2.0)")
    p.add_argument("--crop-input", choices=("both", "crop"), help="mode crop: pass 2 sees the image and the crop "
                   "(both, the default; the demo: crop) or the crop alone")
    p.add_argument("--max-pixels", type=int, help="Qwen2.5-VL: pixel budget of the grid buckets images are resized "
                   "to (default: the model's preprocessor_config.json max_pixels)")
    p.add_argument("--dtype", choices=("bfloat16", "float32", "float16"),
                   help="compute dtype (default bfloat16; demo float32)")
    p.add_argument("--tfds-dir", help="where prepared datasets go (default $TFDS_DATA_DIR or ~/tensorflow_datasets)")
    p.add_argument("--save-traces", action="store_true", help="write traces_<bench>_<mode>.jsonl for eval.report")
    p.add_argument("--retry-errors", action="store_true", help="ask again the questions recorded as errors")
    p.add_argument("--seed", type=int, default=0, help="seed of the random-region ablation")
    p.add_argument("--no-pad-to-square", action="store_true", help="llava-hf's centre crop instead of LLaVA's padding")
    p.add_argument("--no-progress", action="store_true")
    p.add_argument("--mesh", help=f"{sharding.MESH_HELP}; default: every device on the data axis when the model fits "
                                  f"one device")
    distributed.add_arguments(p)
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    if distributed.requested(args):
        try:
            distributed.initialize_from_args(args)
        except distributed.DistributedError as e:
            print(f"eval.run: {e}", file=sys.stderr)
            return EXIT_USAGE
    defaults = {"batch_size": 8, "dtype": "bfloat16", "out": f"eval_out/{args.bench}"}
    if args.model is None:
        from eval.demo import DEMO

        demo_data = DEMO.data_dir(args.bench)
        if demo_data is None:
            print(NO_MODEL.format(bench=args.bench), file=sys.stderr)
            print(f"(the bundled demo model has data for --bench {' / '.join(b for b, _ in DEMO.data_dirs)} only)",
                  file=sys.stderr)
            return EXIT_USAGE
        missing = DEMO.missing()
        if missing:
            print(f"eval.run: the bundled demo is incomplete, {', '.join(map(str, missing))} missing: restore the "
                  f"demo/ folder from the repository (git checkout -- demo) or pass --model", file=sys.stderr)
            return EXIT_USAGE
        args.model = str(DEMO.model)
        args.data_dir = args.data_dir or str(demo_data)
        args.tokensr = args.tokensr or str(DEMO.tokensr)
        defaults = {"batch_size": DEMO.batch_size, "dtype": DEMO.dtype, "out": DEMO.out, "tau_exp": DEMO.tau_exp,
                    "tau_drop": DEMO.tau_drop, "crop_input": DEMO.crop_input}
        if args.modes is None:  # the four-way comparison; crop runs in one process only
            args.modes = ",".join(m for m in DEMO.modes if m != "crop" or args.num_processes in (None, 1))
        print(f"eval.run: no --model: running the bundled demo model ({args.model}) on {args.data_dir}"
              + ("" if args.data_dir == str(demo_data) else " (your --data-dir; pass --model to evaluate another "
                 "model)"), file=sys.stderr)
    for name, value in defaults.items():
        if getattr(args, name) is None:
            setattr(args, name, value)
    model = args.model
    if args.data_dir is None:
        print(f"eval.run: --data-dir is required: the folder with {args.bench}'s release files", file=sys.stderr)
        return EXIT_USAGE

    from blink_jax import CheckpointError, ConfigError, rundir
    from blink_jax.hub import resolve_model_dir
    from blink_jax.processing import ImageError, ProcessorError
    from eval.benchmarks import DataError
    from blink_jax.blink.config import parse_layers
    from eval.harness.modes import ModeError
    from eval.harness.resume import RunConflict
    from eval.harness.runner import EvalConfig, run_eval

    if args.modes is None:
        modes = ("vanilla", "interp", "blink") if args.tokensr else ("vanilla", "interp")
        if not args.tokensr:
            print("eval.run: no --tokensr, running vanilla and interp (mode blink needs trained TokenSR)",
                  file=sys.stderr)
    else:
        modes = tuple(m.strip() for m in args.modes.split(",") if m.strip())
    try:
        model = str(resolve_model_dir(model))  # a Hub id runs from (and run.json records) its cached snapshot
        cfg = EvalConfig(
            bench=args.bench, model=model, data_dir=args.data_dir, out=args.out,
            modes=modes, tokensr=args.tokensr, ablation=args.ablation, limit=args.limit, batch_size=args.batch_size,
            bucket=args.bucket, max_new_tokens=args.max_new_tokens,
            layers=None if args.layers is None else parse_layers(args.layers),
            region_size=args.region_size, tau_exp=args.tau_exp, tau_drop=args.tau_drop, crop_layer=args.crop_layer,
            crop_context=args.crop_context, crop_input=args.crop_input, dtype=args.dtype,
            tfds_dir=args.tfds_dir, save_traces=args.save_traces, retry_errors=args.retry_errors, seed=args.seed,
            pad_to_square=not args.no_pad_to_square, progress=not args.no_progress, mesh=args.mesh,
            max_pixels=args.max_pixels)
    except (ValueError, FileNotFoundError) as e:  # flags out of range, a --model that is not there
        print(f"eval.run: {e}", file=sys.stderr)
        return EXIT_USAGE
    try:
        tfds_dir = cfg.tfds_dir or os.environ.get("TFDS_DATA_DIR") or os.path.expanduser("~/tensorflow_datasets")
        for place, flag in ((cfg.out, "--out"), (tfds_dir, "--tfds-dir")):  # named before the model loads
            rundir.check_writable(place, flag=flag)
        # one run per output directory; each process of a multi-process run locks its own file
        with rundir.hold(cfg.out, process=jax.process_index(), flag="--out"):
            document = run_eval(cfg)
    except (DataError, ModeError, RunConflict, CheckpointError, ConfigError, ProcessorError, ImageError,
            FileNotFoundError, rundir.DirectoryBusy, rundir.NotWritable, sharding.MeshError) as e:
        print(f"eval.run: {e}", file=sys.stderr)
        return EXIT_USAGE
    except OSError as e:
        message = rundir.failed_write(e, resume=f"rerun the same command: every answer saved in {cfg.out} is kept")
        if message is None:
            raise
        print(f"eval.run: {message}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        print(f"\neval.run: interrupted; every answer so far is saved in {cfg.out}: rerun the same command to go on",
              file=sys.stderr)
        return 130
    from eval.harness.results import markdown_table

    if document is None:  # not process 0: it writes and shows the results
        return 0
    print(markdown_table(document))
    print(f"results: {cfg.out}/results.json, {cfg.out}/results.md")
    for name, entry in document["modes"].items():
        if entry["errors"]:
            shown = "; ".join(f"{e['question_id']}: {e['error']}" for e in entry["errors"][:3])
            print(f"eval.run: mode {name}: {len(entry['errors'])} question(s) could not be answered and count as wrong "
                  f"in its metrics ({shown}{'; ...' if len(entry['errors']) > 3 else ''}); fix them and rerun with "
                  f"--retry-errors", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
