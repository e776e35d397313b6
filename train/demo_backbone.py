"""Train the demo LLaVA-1.5 from scratch on procedurally drawn shapes and write it as a Hugging Face directory.

    python -m train.demo_backbone --out demo/model [--steps N] [--batch-size B] [--seed S] [--image-size 168]

The model is the LLaVA-1.5 architecture at toy size (CLIP ViT, mlp2x_gelu projector, Llama decoder, a
word-level tokenizer); the task is "Is there a {colour} {shape} in the image?" over scenes of small shapes,
some well below one 14 px patch, plus zoomed crops of them (`demo.shapes`). The run is a function of
--seed: the same command gives the same weights on the same software.

Writes --out atomically: config.json, generation_config.json, model.safetensors, tokenizer files,
train_log.jsonl (the metrics) and demo_backbone.json (command, settings, timings, final metrics). While it
runs, the metrics go to OUT.log.jsonl beside --out. Optionally writes the POPE-format eval set
(--pope-out) and scores the trained model on it. The work is in `train.demo.backbone`.
"""

from __future__ import annotations

import argparse
import json
import shlex
import sys
from pathlib import Path


def parser() -> argparse.ArgumentParser:
    from demo import shapes
    from train.demo.backbone import DemoModelConfig, TrainSettings

    m, t = DemoModelConfig(), TrainSettings()
    p = argparse.ArgumentParser(prog="python -m train.demo_backbone", description=__doc__.split("\n\n")[0],
                                epilog=__doc__.split("\n\n", 2)[2], formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", required=True, help="output Hugging Face directory (replaced if it exists)")
    g = p.add_argument_group("training")
    g.add_argument("--vision-steps", type=int, default=t.vision_steps,
                   help="stage 1: steps of the vision tower alone, on per-patch class labels (default %(default)s)")
    g.add_argument("--vision-batch-size", type=int, default=t.vision_batch_size,
                   help="stage 1: images per step (default %(default)s)")
    g.add_argument("--vision-lr", type=float, default=t.vision_lr, help="stage 1: peak learning rate (default %(default)s)")
    g.add_argument("--steps", type=int, default=t.steps, help="stage 2: steps of the whole model (default %(default)s)")
    g.add_argument("--batch-size", type=int, default=t.batch_size, help="stage 2: images per step (default %(default)s)")
    g.add_argument("--questions-per-image", type=int, default=t.questions_per_image,
                   help="yes/no questions packed with each image, half yes (default %(default)s)")
    g.add_argument("--seed", type=int, default=t.seed, help="seeds the weights and the data (default %(default)s)")
    g.add_argument("--lr", type=float, default=t.lr, help="stage 2: peak AdamW learning rate (default %(default)s)")
    g.add_argument("--lm-weight", type=float, default=t.lm_weight,
                   help="stage 2: weight of the next-token loss on the question's words (default %(default)s)")
    g.add_argument("--aux-weight", type=float, default=t.aux_weight,
                   help="stage 2: weight of the vision tower's per-patch loss (default %(default)s)")
    g.add_argument("--ground-weight", type=float, default=t.ground_weight,
                   help="stage 2: weight of the grounding loss on the answering row's image attention "
                        "(default %(default)s)")
    g.add_argument("--ground-layers", default=",".join(map(str, t.ground_layers)),
                   help="stage 2: decoder layers the grounding loss applies to, comma-separated, '' for none "
                        "(default %(default)s)")
    g.add_argument("--ground-background", action="store_true",
                   help="stage 2: also ground the 'no' questions, on the image's empty patches")
    g.add_argument("--ground-lookalikes", action="store_true",
                   help="stage 2: ground the 'no' questions on the shapes in view of the asked colour (else of its "
                        "shape), so that the answer has to read what that shape is")
    g.add_argument("--name-weight", type=float, default=t.name_weight,
                   help="stage 2: weight of a loss that has each image token name, at the decoder's output, the "
                        "colour and shape word of the shape centred on it (default %(default)s: off)")
    g.add_argument("--easy-steps", type=int, default=t.easy_steps,
                   help="stage 2: its first N steps show scenes of one or two shapes only, an easier start (default "
                        "%(default)s: off)")
    g.add_argument("--warmup-steps", type=int, default=t.warmup_steps, help="per stage (default %(default)s)")
    g.add_argument("--weight-decay", type=float, default=t.weight_decay, help="(default %(default)s)")
    g.add_argument("--p-zoom", type=float, default=t.p_zoom,
                   help="share of training images that are crops of the original around a region, zoomed "
                        "(default %(default)s)")
    g.add_argument("--p-teacher", type=float, default=t.p_teacher,
                   help="share of training images that are regions of the downsampled scene upsampled, as "
                        "TokenSR's teacher sees them (default %(default)s)")
    g.add_argument("--p-shape", type=float, default=t.p_shape,
                   help="share of 'no' questions about an absent class in a colour the image has (a red square "
                        "when a red circle is there), answerable only by reading shape (default %(default)s)")
    g.add_argument("--p-sibling", type=float, default=t.p_sibling,
                   help="with --checked: share of 'no' questions about another checked colour of a present check's "
                        "shape (a green square when a red-checked square is there), the same grey at full scale, "
                        "so that a shape too small to show its check is not 'yes' to all three colours (default "
                        "%(default)s)")
    g.add_argument("--eval-every", type=int, default=t.eval_every, help="validation every N steps (default %(default)s)")
    g.add_argument("--val-images", type=int, default=t.val_images,
                   help="validation scenes (and half as many zoomed crops) (default %(default)s)")
    g.add_argument("--log-every", type=int, default=t.log_every, help="(default %(default)s)")
    g.add_argument("--init-from", metavar="DIR",
                   help="start from this backbone (one this command wrote, with its probe.safetensors; or, with "
                        "--new-probe, any LLaVA directory of the demo's sizes) instead of from scratch: a "
                        "curriculum; give its model sizes, and --vision-steps 0 to skip stage 1")
    g.add_argument("--new-probe", action="store_true",
                   help="with --init-from: start the patch probe afresh (from --seed) instead of from DIR's; with "
                        "--vision-steps 0 it then learns only through stage 2's probe loss (--aux-weight)")
    shapes.add_world_arguments(p)  # --pope-out writes scenes of the same world
    g = p.add_argument_group("model size")
    g.add_argument("--image-size", type=int, default=m.image_size, help="pixels; a multiple of 14 (default %(default)s)")
    g.add_argument("--vision-width", type=int, default=m.vision_width, help="(default %(default)s)")
    g.add_argument("--vision-layers", type=int, default=m.vision_layers, help="(default %(default)s)")
    g.add_argument("--text-width", type=int, default=m.text_width, help="(default %(default)s)")
    g.add_argument("--text-layers", type=int, default=m.text_layers, help="(default %(default)s)")
    g.add_argument("--text-heads", type=int, default=m.text_heads, help="(default %(default)s)")
    g.add_argument("--text-kv-heads", type=int, default=m.text_kv_heads, help="(default %(default)s)")
    g.add_argument("--text-mlp", type=int, default=m.text_mlp, help="(default %(default)s)")
    g = p.add_argument_group("output")
    g.add_argument("--dtype", default="float16", choices=("float16", "bfloat16", "float32"),
                   help="storage dtype of model.safetensors (default %(default)s)")
    g.add_argument("--pope-out", help="also write the POPE-format eval set here and score the model on it")
    g.add_argument("--pope-images", type=int, default=150, help="scenes in the eval set (default %(default)s)")
    g.add_argument("--pope-seed", type=int, default=0, help="(default %(default)s)")
    g.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p


def main(argv: list[str] | None = None) -> int:
    args = parser().parse_args(argv)
    import ml_dtypes
    import numpy as np

    from demo import shapes
    from train.demo import backbone

    if args.new_probe and not args.init_from:
        print("--new-probe starts a probe for the backbone of --init-from, which is not given", file=sys.stderr)
        return 2
    if args.p_sibling and not args.checked:
        print(f"--p-sibling {args.p_sibling} asks about the other colours of a check, which only --checked draws: "
              f"add --checked, or drop --p-sibling", file=sys.stderr)
        return 2
    if args.image_size % 14:
        print(f"--image-size {args.image_size} is not a multiple of the 14 px patch", file=sys.stderr)
        return 2
    model_cfg = backbone.DemoModelConfig(
        image_size=args.image_size, vision_width=args.vision_width, vision_layers=args.vision_layers,
        text_width=args.text_width, text_layers=args.text_layers, text_heads=args.text_heads,
        text_kv_heads=args.text_kv_heads, text_mlp=args.text_mlp)
    settings = backbone.TrainSettings(
        vision_steps=args.vision_steps, vision_batch_size=args.vision_batch_size, vision_lr=args.vision_lr,
        lm_weight=args.lm_weight, aux_weight=args.aux_weight, ground_weight=args.ground_weight,
        ground_background=args.ground_background, ground_lookalikes=args.ground_lookalikes,
        name_weight=args.name_weight, easy_steps=args.easy_steps,
        ground_layers=tuple(int(x) for x in args.ground_layers.split(",") if x.strip()), steps=args.steps, batch_size=args.batch_size,
        questions_per_image=args.questions_per_image, lr=args.lr,
        warmup_steps=args.warmup_steps, weight_decay=args.weight_decay, p_zoom=args.p_zoom, p_teacher=args.p_teacher,
        p_shape=args.p_shape, p_sibling=args.p_sibling, world=shapes.world_from_args(args), seed=args.seed,
        eval_every=args.eval_every, val_images=args.val_images, log_every=args.log_every)
    out = Path(args.out)
    log_path = out.parent / f"{out.name}.log.jsonl"
    log_path.parent.mkdir(parents=True, exist_ok=True)
    command = "python -m train.demo_backbone " + shlex.join(sys.argv[1:] if argv is None else argv)
    init = None
    if args.init_from:
        try:
            init = backbone.load_backbone(args.init_from, new_probe_seed=args.seed if args.new_probe else None)
        except FileNotFoundError as e:
            print(f"--init-from {args.init_from}: {e}", file=sys.stderr)
            return 2
    with open(log_path, "w") as log:
        def write(record):
            log.write(json.dumps(record) + "\n")
            log.flush()
        result = backbone.train(model_cfg, settings, log=write, progress=not args.no_progress, init=init)
    info = backbone.run_info(model_cfg, settings, result, command)
    if args.pope_out:
        info["pope_data"] = {"dir": args.pope_out, "images": args.pope_images, "seed": args.pope_seed,
                             "questions": shapes.write_pope(args.pope_out, args.pope_images, args.pope_seed,
                                                            world=settings.world)}
        info["pope_vanilla"] = backbone.evaluate_pope(result.model, args.pope_out)
        info["pope_zoom"] = backbone.evaluate_zoom(result.model, args.pope_out)
    dtype = {"float16": np.float16, "bfloat16": ml_dtypes.bfloat16, "float32": np.float32}[args.dtype]
    files = {"train_log.jsonl": log_path.read_text(), "demo_backbone.json": json.dumps(info, indent=1) + "\n"}
    backbone.save_hf(result.model, model_cfg, out, dtype=dtype, extra_files=files, probe=result.probe)
    log_path.unlink()
    final = result.final
    print(f"wrote {out} in {result.seconds / 60:.1f} min: train accuracy {final['accuracy']:.3f}, "
          f"val accuracy {final.get('val/accuracy', float('nan')):.3f} "
          f"(sub-patch {final.get('val/acc_sub_patch', float('nan')):.3f})")
    if "pope_vanilla" in info:
        for split, m in info["pope_vanilla"]["splits"].items():
            print(f"  POPE {split:12s} accuracy {m['accuracy']:.3f}  f1 {m['f1']:.3f}  yes-ratio {m['yes_ratio']:.3f}")
        zoom = info["pope_zoom"]
        for bucket in ("tiny", "small", "sub_patch", "medium", "large"):
            full, crop = zoom["full"].get(f"full/acc_{bucket}"), zoom["zoom"].get(f"zoom/acc_{bucket}")
            if full is not None:
                print(f"  {bucket:9s} questions: full scene {full:.3f}, zoomed crop of the right region {crop:.3f} "
                      f"({100 * (crop - full):+.1f} points)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
