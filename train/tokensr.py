"""Train Blink's per-layer TokenSR modules on a frozen LLaVA-1.5 or Qwen2.5-VL (BLINK.md §5, §10).

    python -m train.tokensr --model llava-1.5-7b-hf --data-dir LLaVA-Mix --workdir runs/tokensr --mesh tpu_v5e_8
    python -m train.tokensr --model Qwen2.5-VL-7B-Instruct --data-dir LLaVA-Mix --workdir runs/qwen --mesh gpu_1 \
        --layers 10-16 --region-size 4 --max-pixels 501760

The same command runs on one CPU (`--mesh cpu`), 8 simulated CPU devices (`--mesh cpu_8`, with
XLA_FLAGS=--xla_force_host_platform_device_count=8), GPUs, TPU slices and, with `--distributed`, pods.
Rerunning it resumes from the newest checkpoint in the work directory. The trained modules are exported to
`<workdir>/tokensr/`, which `--tokensr DIR` of the evals and `Llava(..., tokensr=load_tokensr(DIR)[0])` take.
This module parses arguments only; the work is in `train.loop`.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from blink_jax import distributed
from blink_jax.blink.config import layers_argument
from blink_jax.hub import resolve_model_dir
from train.config import TRAINED_KINDS, TrainConfig

DEFAULTS = TrainConfig(model="", data_dir="", workdir="")


def parser() -> argparse.ArgumentParser:
    d = DEFAULTS
    p = argparse.ArgumentParser(
        prog="python -m train.tokensr", description=__doc__.split("\n\n")[0],
        epilog="Outputs in --workdir: config.json, metrics.jsonl, checkpoints/<step>/, teacher_cache/, tokensr/.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    io = p.add_argument_group("inputs and outputs")
    io.add_argument("--model", help="(required unless --export-only) LLaVA-1.5 directory: Hugging Face (llava-hf/llava-1.5-7b-hf) or converted "
                    "by checkpoints_conversion.hf_to_orbax; or a Hugging Face Qwen2.5-VL directory (one device)")
    io.add_argument("--data-dir", help="(required unless --export-only) LLaVA-1.5 mix directory: llava_v1_5_mix665k.json and the image folders "
                    "(coco/train2017, gqa/images, ocr_vqa/images, textvqa/train_images, vg/VG_100K{,_2})")
    io.add_argument("--tfds-dir", default=d.tfds_dir, help="where the prepared array_record dataset goes (built on "
                    "first use); default <data-dir>/tfds")
    io.add_argument("--workdir", required=True, help="run directory; rerunning with the same one resumes")
    io.add_argument("--limit", type=int, default=d.limit, help="use only the first N records of the dataset (0: all)")
    io.add_argument("--teacher-cache", default=d.teacher_cache, help="teacher target cache directory, shareable "
                    "between runs of the same model ('' = <workdir>/teacher_cache, 'none' = no cache)")
    io.add_argument("--cache-dtype", default=d.cache_dtype, choices=("float32", "bfloat16", "float16"),
                    help="precision of the teacher targets (cached or not)")
    io.add_argument("--export-only", action="store_true", help="only export the newest checkpoint of --workdir "
                    "to <workdir>/tokensr/ (after a multi-host run)")

    blink = p.add_argument_group("TokenSR (BLINK.md §4)")
    blink.add_argument("--layers", type=layers_argument, default=d.layers, help="participating layers, e.g. 12-18 or 1,2")
    blink.add_argument("--region-size", type=int, default=d.region_size, help="r: regions are r x r visual tokens")
    blink.add_argument("--scale", type=int, default=d.scale, help="s: TokenSR output is (s r) x (s r)")
    blink.add_argument("--kind", default=d.kind, choices=TRAINED_KINDS,
                       help="TokenSR kind: conv (3x3 convolutions) or mlp (per-token dense layers)")
    blink.add_argument("--channels", type=int, default=d.channels, help="bottleneck C of the TokenSR")

    opt = p.add_argument_group("optimisation (BLINK.md §5)")
    opt.add_argument("--batch-size", type=int, default=d.batch_size, help="global batch, over all hosts")
    opt.add_argument("--steps", type=int, default=d.steps, help="total optimiser steps")
    opt.add_argument("--lr", type=float, default=d.lr, help="peak AdamW learning rate")
    opt.add_argument("--warmup-steps", type=int, default=d.warmup_steps, help="linear warm-up from 0")
    opt.add_argument("--end-lr-ratio", type=float, default=d.end_lr_ratio, help="cosine ends at lr * this")
    opt.add_argument("--clip-norm", type=float, default=d.clip_norm, help="global gradient-norm clip (0: off)")
    opt.add_argument("--weight-decay", type=float, default=d.weight_decay, help="AdamW decay of conv kernels")
    opt.add_argument("--mse-weight", type=float, default=d.mse_weight, help="weight of the MSE term next to the KL")
    opt.add_argument("--temperature", type=float, default=d.temperature, help="T of the KL over the hidden dim")
    opt.add_argument("--p-random-region", type=float, default=d.p_random_region,
                     help="probability of a uniformly random region instead of the SGS region r*")
    opt.add_argument("--seed", type=int, default=d.seed, help="data order, random regions, TokenSR init")

    run = p.add_argument_group("run")
    run.add_argument("--mesh", default=d.mesh, help="preset (cpu, cpu_8, gpu_1, gpu_8, tpu_v4_8, tpu_v5e_8) or "
                     "axis sizes, e.g. data:2,fsdp:4 (axes data, fsdp, tensor; one may be -1)")
    run.add_argument("--distributed", action="store_true", help="call jax.distributed.initialize() (multi-host)")
    distributed.add_arguments(run)
    run.add_argument("--backbone-dtype", default=d.backbone_dtype, choices=("float32", "bfloat16"),
                     help="dtype of the frozen LLaVA")
    run.add_argument("--max-prompt-len", type=int, default=d.max_prompt_len,
                     help="prompts are padded to this many tokens; longer samples are skipped")
    run.add_argument("--save-every", type=int, default=d.save_every, help="checkpoint every N steps")
    run.add_argument("--keep", type=int, default=d.keep, help="checkpoints kept")
    run.add_argument("--log-every", type=int, default=d.log_every, help="metrics interval in steps")
    run.add_argument("--data-workers", type=int, default=d.data_workers, help="grain worker processes")
    run.add_argument("--no-pad-to-square", dest="pad_to_square", action="store_false",
                     help="use llava-hf's preprocessing instead of LLaVA-1.5's padding to square (expand2square, "
                     "the default)%(default).0s")
    run.add_argument("--max-pixels", type=int, default=d.max_pixels,
                     help="Qwen2.5-VL: pixel budget of the grid buckets images are resized to (0: the model's "
                     "preprocessor_config.json); each batch holds one grid shape")
    run.add_argument("--no-progress", dest="progress", action="store_false",
                     help="no progress bar%(default).0s")  # (%(default).0s: no misleading "(default: True)")
    return p


def main(argv=None) -> int:
    args = parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    logging.getLogger("absl").setLevel(logging.WARNING)  # orbax and tfds narrate every file at INFO
    from train import loop
    from train.stopping import NonFiniteLossError, TrainingInterrupted

    from blink_jax import CheckpointError, ConfigError
    from blink_jax.blink.config import in_flag_terms
    from blink_jax import rundir
    from blink_jax.rundir import DirectoryBusy
    from train.config import TrainConfigError
    from train.data.pipeline import DataError
    from blink_jax.processing import ProcessorError
    from blink_jax.sharding import MeshError

    if args.export_only:
        try:
            print(loop.export_only(args.workdir))
        except (FileNotFoundError, ConfigError, CheckpointError, TrainConfigError) as e:
            print(f"error: --export-only: {e}; --workdir must be the work directory of a `python -m train.tokensr` "
                  f"run (its config.json and checkpoints/)", file=sys.stderr)
            return 2
        return 0
    missing = [f"--{name.replace('_', '-')}" for name in ("model", "data_dir") if not getattr(args, name)]
    if missing:
        parser().error(f"{' and '.join(missing)} required")

    fields = {k: v for k, v in vars(args).items()
              if k not in ("export_only", "progress", "coordinator", "num_processes", "process_id")}
    try:
        if distributed.requested(args):
            distributed.initialize_from_args(args)
        fields["model"] = os.fspath(resolve_model_dir(args.model))  # a Hub id trains on (and records) its snapshot
        cfg = TrainConfig(**fields)
        for place, flag in ((cfg.workdir, "--workdir"), (cfg.tfds_path, "--tfds-dir"),
                            (cfg.cache_path, "--teacher-cache")):
            if place is not None:  # before anything loads: a read-only or full disk is named now
                rundir.check_writable(place, flag=flag)
        result = loop.train(cfg, progress=args.progress)
    except (TrainConfigError, MeshError, ConfigError, CheckpointError, DataError, distributed.DistributedError,
            ProcessorError,
            FileNotFoundError, DirectoryBusy, rundir.NotWritable) as e:
        print(f"error: {in_flag_terms(str(e))}", file=sys.stderr)
        return 2
    except OSError as e:
        message = rundir.failed_write(e, resume="rerun the same command: it resumes from the last checkpoint")
        if message is None:
            raise
        print(f"error: {message}", file=sys.stderr)
        return 1
    except NonFiniteLossError as e:
        print(f"error: {e}", file=sys.stderr)
        return 1
    except TrainingInterrupted as e:
        print(f"\ntrain.tokensr: {e}", file=sys.stderr)
        return 130
    print(f"trained {result.step} steps; TokenSR: {result.tokensr_dir}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
