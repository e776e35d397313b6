"""Answer one question about one image and show Blink's per-layer decisions.

    python -m eval.predict --model DIR --image cat.jpg --question "What colour is the cat?" \
        --mode interp --layers 12-18 --plot trace.png

The model is LLaVA-1.5 or Qwen2.5-VL (its chat template around the question and LLaVA's short-answer suffix, the
image resized to its grid bucket, BLINK.md §10; the crop mode is LLaVA's only).
Modes: `vanilla` (the model alone; the trace shows its saliency scan, nothing expands), `interp`
(Blink-interp, training-free TokenSR), `blink` (trained TokenSR from `--tokensr DIR`) and `crop` (the two-pass
baseline of BLINK.md §9: `--crop-layer`, `--crop-context`, `--crop-input`).
The `--plot` figure is the scan-focus-shift view: per participating layer, the image the model saw
under the last prompt token's head-mean visual attention S_v, the region grid, r* and the expansion; for
`crop`, pass 1's S_v and r*, the crop box on the original image, and the crop as pass 2 saw it.
Letters: Gh x Gw the visual grid, Lp participating layers.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import os
import sys
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from blink_jax import CheckpointError, ConfigError, InputError, load_pretrained, sharding
from blink_jax.blink import BlinkConfig, CropConfig, crop_generate
from blink_jax.blink.checkpoint import load_tokensr
from blink_jax.blink.config import layers_argument
from blink_jax.blink.dtr import ACTION_NAMES, EXPAND, KEEP, NO_REGION, NONE
from blink_jax.blink.runner import HostTrace, tokensr_bank
from blink_jax.hub import resolve_model_dir
from blink_jax.model.qwen2_5_vl.processing import resize_uint8
from blink_jax.processing import (CLIP_MEAN, CLIP_STD, ImageError, ProcessorError, build_prompt, left_pad,
                                  load_image, normalize, tokenize_with_image)
from eval.calibrate import is_qwen, load_model_and_processor, scan, user_text
from eval.harness.flags import positive_int

MODES = ("vanilla", "interp", "blink", "crop")


@dataclasses.dataclass(frozen=True)
class Prediction:
    answer: str
    tokens: np.ndarray  # [N] generated ids, EOS and padding included
    trace: HostTrace | None  # per participating layer, batch of one
    pixel_values: np.ndarray  # [3, H, W] what the model saw
    prompt: str
    crop_box: tuple[int, int, int, int] | None = None  # crop mode: (left, top, right, bottom) in the original
    crop_pixel_values: np.ndarray | None = None  # crop mode: [3, H, W] the crop as pass 2 saw it


def vanilla_trace(llava, inputs: dict, layers: Sequence[int], region_size: int) -> HostTrace:
    """A trace of the vanilla model: the saliency scan of `probe_layers`, action `none` everywhere."""
    rho, region, attention = scan(llava, inputs["input_ids"], inputs["pixel_values"], inputs["attention_mask"],
                                  layers=layers, region_size=region_size, image_grid_thw=inputs.get("image_grid_thw"))
    return HostTrace(layers=tuple(layers), rho=rho, region=region, action=np.full(rho.shape, NONE, np.int32),
                     expanded_region=np.full(rho.shape, NO_REGION, np.int32), attention=attention)


def answer_text(processor, tokens: np.ndarray, eos_token_id: int | None) -> str:
    """Generated ids [N] -> the answer, cut at the first EOS."""
    tokens = np.asarray(tokens).reshape(-1)
    if eos_token_id is not None:
        hits = np.flatnonzero(tokens == eos_token_id)
        tokens = tokens[:hits[0]] if hits.size else tokens
    return processor.decode(tokens)


def predict(llava, processor, image, question: str, blink: BlinkConfig | None = None, tokensr=None, *,
            max_new_tokens: int = 16, scan_config: BlinkConfig | None = None) -> Prediction:
    """Greedy answer to `question` about `image` (a PIL image or a path) with the LLaVA eval prompt.

    `blink=None` runs vanilla LLaVA; then `scan_config` (its `layers` and `region_size`), if given, adds
    the vanilla saliency trace. With a `blink` config the trace is Blink's (its S_v only with
    `return_attention=True`); `tokensr` is the trained bank for `tokensr_kind="conv"`.
    """
    cfg = llava.config
    if is_qwen(processor):  # the chat template around the question and the suffix; the image's grid bucket
        image = image if not isinstance(image, (str, os.PathLike)) else load_image(image)
        prompt = processor.prompt(user_text(question))
        inputs = processor([user_text(question)], [image])
        grid = processor.grid_of(image)
        shown = normalize(resize_uint8(image, processor.image_config))
    else:
        prompt = build_prompt(question)
        inputs = processor([prompt], [image])
        grid, shown = cfg.vision.grid, None
    run = dict(input_ids=inputs["input_ids"], pixel_values=inputs["pixel_values"],
               attention_mask=inputs["attention_mask"], max_new_tokens=max_new_tokens,
               **({"image_grid_thw": inputs["image_grid_thw"]} if "image_grid_thw" in inputs else {}))
    if blink is not None:
        blink.validate_for(cfg.text.num_hidden_layers, grid)
        tokens, trace = llava.generate(**run, blink=blink, tokensr=tokensr, return_trace=True)
    else:
        if scan_config is not None:
            scan_config.validate_for(cfg.text.num_hidden_layers, grid)
        tokens = llava.generate(**run)
        trace = None if scan_config is None else vanilla_trace(llava, inputs, scan_config.layers,
                                                               scan_config.region_size)
    return Prediction(answer=answer_text(processor, tokens[0], cfg.text.eos_token_id), tokens=np.asarray(tokens[0]),
                      trace=trace, pixel_values=inputs["pixel_values"][0] if shown is None else shown, prompt=prompt)


def predict_crop(llava, processor, image, question: str, crop: CropConfig, *,
                 max_new_tokens: int = 16) -> Prediction:
    """The crop mode's greedy answer (`blink_jax.blink.crop_generate`, batch of one); its trace is pass 1's scan
    at `crop.crop_layer`, action `none`."""
    cfg = llava.config
    image = image if not isinstance(image, (str, os.PathLike)) else load_image(image)
    prompt = build_prompt(question)
    inputs = processor([prompt], [image])
    both = {}
    if crop.crop_input == "both":
        ids = tokenize_with_image(processor.tokenizer, build_prompt(question, images=2), cfg.image_token_index,
                                  cfg.num_image_tokens, images=2)
        both_ids, both_mask = left_pad([ids], processor.pad_id)
        both = dict(both_input_ids=both_ids, both_attention_mask=both_mask)
    result = crop_generate(llava, **inputs, images=[image], crop=crop, pad_to_square=processor.pad_to_square,
                           max_new_tokens=max_new_tokens, **both)
    trace = HostTrace(layers=(crop.crop_layer,), rho=result.rho[None], region=result.region[None],
                      action=np.full((1, 1), NONE, np.int32), expanded_region=np.full((1, 1), NO_REGION, np.int32),
                      attention=result.attention[None])
    return Prediction(answer=answer_text(processor, result.tokens[0], cfg.text.eos_token_id),
                      tokens=np.asarray(result.tokens[0]), trace=trace, pixel_values=inputs["pixel_values"][0],
                      prompt=prompt, crop_box=result.boxes[0], crop_pixel_values=result.crop_pixel_values[0])


def format_trace(trace: HostTrace, example: int = 0) -> str:
    """One row per participating layer: layer, rho, r*, action, and the region whose SR tokens enter L+1."""
    lines = [f"{'layer':>5}  {'rho':>6}  {'r*':>3}  {'action':<6}  expanded"]
    for j, layer in enumerate(trace.layers):
        expanded = int(trace.expanded_region[j, example])
        lines.append(f"{layer:>5}  {float(trace.rho[j, example]):>6.4f}  {int(trace.region[j, example]):>3}  "
                     f"{ACTION_NAMES[int(trace.action[j, example])]:<6}  {'-' if expanded == NO_REGION else expanded}")
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------- plot


def display_image(pixel_values: np.ndarray) -> np.ndarray:
    """CLIP-normalised [3, H, W] -> uint8 [H, W, 3], the image as the model saw it."""
    mean, std = np.asarray(CLIP_MEAN)[:, None, None], np.asarray(CLIP_STD)[:, None, None]
    rgb = (np.asarray(pixel_values, np.float64) * std + mean).transpose(1, 2, 0)
    return np.clip(np.round(rgb * 255), 0, 255).astype(np.uint8)


def save_figure(fig, out_path: str | os.PathLike, title: str | None):
    """Titles `fig` and writes it as a PNG atomically (a killed run never leaves half an image)."""
    if title:
        fig.suptitle(title, fontsize=11)
    out_path = Path(out_path)
    out_path.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_path.parent / f".{out_path.name}.tmp-{os.getpid()}"
    fig.savefig(tmp, format="png")
    os.replace(tmp, out_path)
    return fig


def plot_trace(image: np.ndarray, trace: HostTrace, out_path: str | os.PathLike, *, region_size: int,
               example: int = 0, title: str | None = None, columns: int = 4):
    """The scan-focus-shift figure, one panel per participating layer; writes a PNG atomically.

    image: uint8 [H, W, 3] (`display_image(prediction.pixel_values)`). Returns the matplotlib Figure,
    whose `axes` are the panels in layer order.
    """
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.patches import Patch, Rectangle

    if trace.attention is None:
        raise ValueError("the trace has no attention maps S_v: run Blink with BlinkConfig(return_attention=True)")
    gh, gw = trace.attention.shape[-2:]
    if gh % region_size or gw % region_size:
        raise ValueError(f"region_size={region_size} does not divide the attention grid {gh} x {gw}")
    height, width = image.shape[:2]
    per_side, per_column = gw // region_size, gh // region_size  # regions per row, per column
    box_w, box_h = width / per_side, height / per_column
    panels = len(trace.layers)
    cols = min(columns, panels)
    rows = math.ceil(panels / cols)
    legend_columns = 3 if cols >= 3 else 1  # a narrow figure stacks the legend
    top, bottom = (0.4 if title else 0.0), (0.3 if legend_columns == 3 else 0.7)  # inches: title, legend
    fig = Figure(figsize=(3.2 * cols, 3.7 * rows + top + bottom), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    for j, layer in enumerate(trace.layers):
        ax = fig.add_subplot(rows, cols, j + 1)
        s_v = np.asarray(trace.attention[j, example], np.float64)  # [Gh, Gw]
        ax.imshow(image, extent=(0, width, height, 0))
        # Per-panel min-max colour scale, so the focus shows even when attention is nearly flat (rho says how flat).
        ax.imshow(s_v, extent=(0, width, height, 0), cmap="inferno", alpha=0.55, interpolation="nearest",
                  vmin=float(s_v.min()), vmax=max(float(s_v.max()), float(s_v.min()) + 1e-12))
        for k in range(1, per_side):  # the region grid
            ax.axvline(k * box_w, color="white", linewidth=0.7, alpha=0.8)
        for k in range(1, per_column):
            ax.axhline(k * box_h, color="white", linewidth=0.7, alpha=0.8)
        action = int(trace.action[j, example])
        expanded = int(trace.expanded_region[j, example])
        if action in (EXPAND, KEEP) and expanded != NO_REGION:
            r, c = divmod(expanded, per_side)
            ax.add_patch(Rectangle((c * box_w, r * box_h), box_w, box_h, facecolor=(0.0, 0.9, 1.0, 0.25),
                                   edgecolor="cyan", linewidth=2.5))
        r, c = divmod(int(trace.region[j, example]), per_side)
        ax.add_patch(Rectangle((c * box_w, r * box_h), box_w, box_h, fill=False, edgecolor="yellow",
                               linewidth=2.0, linestyle="--"))
        focus = f" \u2192 region {expanded}" if expanded != NO_REGION else ""
        ax.set_title(f"layer {layer}: \u03c1 = {float(trace.rho[j, example]):.3f}, r* = {r * per_side + c}\n"
                     f"{ACTION_NAMES[action]}{focus}", fontsize=10)
        ax.set_xlim(0, width)
        ax.set_ylim(height, 0)
        ax.set_xticks([])
        ax.set_yticks([])
    fig.legend(handles=[Patch(fill=False, edgecolor="yellow", linestyle="--", linewidth=2, label="r* (most attended)"),
                        Patch(facecolor=(0.0, 0.9, 1.0, 0.25), edgecolor="cyan", linewidth=2,
                              label="expanded region (its SR tokens enter layer L+1)"),
                        Patch(facecolor="#b73779", label="S_v, last token's visual attention (per-panel scale)")],
               loc="outside lower center", ncol=legend_columns, frameon=False, fontsize=8)
    return save_figure(fig, out_path, title)


def plot_crop(prediction: Prediction, original: np.ndarray, out_path: str | os.PathLike, *, region_size: int,
              title: str | None = None):
    """The crop mode's figure: pass 1's S_v and r* on the image the model saw, the crop box on the original
    image (uint8 [H, W, 3]), and the crop as pass 2 saw it; writes a PNG atomically. Returns the Figure."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from matplotlib.patches import Rectangle

    trace = prediction.trace
    seen = display_image(prediction.pixel_values)
    size = seen.shape[0]
    grid = trace.attention.shape[-1]
    per_side, side = grid // region_size, size * region_size / grid
    fig = Figure(figsize=(9.6, 3.6 + (0.4 if title else 0)), dpi=110, layout="constrained")
    FigureCanvasAgg(fig)
    axes = [fig.add_subplot(1, 3, k + 1) for k in range(3)]
    s_v = np.asarray(trace.attention[0, 0], np.float64)
    axes[0].imshow(seen, extent=(0, size, size, 0))
    axes[0].imshow(s_v, extent=(0, size, size, 0), cmap="inferno", alpha=0.55, interpolation="nearest",
                   vmin=float(s_v.min()), vmax=max(float(s_v.max()), float(s_v.min()) + 1e-12))
    r, c = divmod(int(trace.region[0, 0]), per_side)
    axes[0].add_patch(Rectangle((c * side, r * side), side, side, fill=False, edgecolor="yellow", linewidth=2,
                                linestyle="--"))
    axes[0].set_title(f"pass 1, layer {trace.layers[0]}: \u03c1 = {float(trace.rho[0, 0]):.3f}, r* = "
                      f"{int(trace.region[0, 0])}", fontsize=9)
    x0, y0, x1, y1 = prediction.crop_box
    axes[1].imshow(original)
    axes[1].add_patch(Rectangle((x0 - 0.5, y0 - 0.5), x1 - x0, y1 - y0, fill=False, edgecolor="yellow", linewidth=2))
    axes[1].set_title(f"crop {x1 - x0} x {y1 - y0} px of {original.shape[1]} x {original.shape[0]}", fontsize=9)
    axes[2].imshow(display_image(prediction.crop_pixel_values))
    axes[2].set_title("pass 2 sees the crop", fontsize=9)
    for ax in axes:
        ax.set_xticks([])
        ax.set_yticks([])
    return save_figure(fig, out_path, title)


# ---------------------------------------------------------------------------------------------- CLI


def blink_settings(mode: str, *, layers=None, region_size=None, tau_exp=None, tau_drop=None, tokensr_dir=None):
    """-> (the BlinkConfig of the run, or of the vanilla scan; the TokenSR bank or None) from CLI values.

    None means "not given": the spec's defaults, or those `--tokensr` was trained with.
    """
    if mode not in MODES:
        raise ConfigError(f"--mode {mode!r} is unknown; use one of {MODES}")
    if mode == "blink" and tokensr_dir is None:
        raise ConfigError("--mode blink runs trained TokenSR: give its directory with --tokensr DIR "
                          "(or use --mode interp, which needs no training)")
    if mode != "blink" and tokensr_dir is not None:
        raise ConfigError(f"--tokensr is only used by --mode blink (got --mode {mode})")
    given = {k: v for k, v in dict(layers=layers, region_size=region_size).items() if v is not None}
    thresholds = {k: v for k, v in dict(tau_exp=tau_exp, tau_drop=tau_drop).items() if v is not None}
    if mode != "blink":  # crop: Blink's geometry (its layers' middle, its region size) is the crop's default
        base = BlinkConfig(**given, return_attention=True)
        return dataclasses.replace(base, **thresholds), None
    try:
        bank, trained = load_tokensr(tokensr_dir)
    except ValueError as e:
        raise ConfigError(f"--tokensr {tokensr_dir}: {e}") from None
    for field, value in given.items():
        if getattr(trained, field) != value:
            raise ConfigError(f"--{field.replace('_', '-')} {value} conflicts with the TokenSR in '{tokensr_dir}', "
                              f"trained for {field}={getattr(trained, field)}: leave the option out")
    return dataclasses.replace(trained, **thresholds, return_attention=True), bank


def check_tokensr(blink: BlinkConfig, hidden_size: int, bank, tokensr_dir) -> None:
    """The checks a forward pass makes on a TokenSR bank (width, layers, geometry), as a ConfigError naming
    --tokensr."""
    try:
        tokensr_bank(blink, hidden_size, bank)
    except ValueError as e:
        raise ConfigError(f"--tokensr {tokensr_dir}: {e}") from None


def build_parser() -> argparse.ArgumentParser:
    defaults = BlinkConfig()
    parser = argparse.ArgumentParser(prog="python -m eval.predict", description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", required=True,
                        help="Hugging Face LLaVA directory, a converted blink-jax one, or a Hub id; or a Hugging Face "
                             "Qwen2.5-VL directory")
    parser.add_argument("--image", required=True, help="the image file")
    parser.add_argument("--question", required=True, help="the question; the LLaVA-1.5 eval prompt is built around "
                                                          "it (short-answer suffix included)")
    parser.add_argument("--mode", choices=MODES, default=None,
                        help="vanilla: LLaVA-1.5 (the trace shows its scan, nothing expands); interp: Blink-interp; "
                             "blink: trained TokenSR from --tokensr. Default: blink with --tokensr, else interp")
    parser.add_argument("--tokensr", default=None, help="directory of trained TokenSR (`train.tokensr`'s export); "
                                                        "its layers and region size are used")
    parser.add_argument("--layers", type=layers_argument, default=None,
                        help=f"participating layers, e.g. 12-18 or 12,14,16 (default {defaults.layers[0]}-"
                             f"{defaults.layers[-1]}, for a 32-layer model: give it for smaller models)")
    parser.add_argument("--region-size", type=positive_int, default=None,
                        help=f"r: regions are r x r visual tokens, r divides the grid side "
                             f"(default {defaults.region_size}: 16 regions on LLaVA-1.5's 24 x 24)")
    parser.add_argument("--tau-exp", type=float, default=None,
                        help=f"expand when rho > tau_exp (default {defaults.tau_exp}, or the TokenSR's; "
                             f"see python -m eval.calibrate)")
    parser.add_argument("--tau-drop", type=float, default=None,
                        help=f"drop the SR tokens when rho < tau_drop (default {defaults.tau_drop}, or the TokenSR's)")
    parser.add_argument("--crop-layer", type=int, default=None,
                        help="--mode crop: pass 1 stops after this layer (default: the middle of --layers)")
    parser.add_argument("--crop-context", type=float, default=None,
                        help="--mode crop: the region's box grown about its centre by this factor (default 2.0)")
    parser.add_argument("--crop-input", choices=("both", "crop"), default=None,
                        help="--mode crop: pass 2 sees the image and the crop (both, default) or the crop alone")
    parser.add_argument("--max-new-tokens", type=positive_int, default=16, help="greedy decoding length (default 16)")
    parser.add_argument("--plot", default=None, metavar="OUT.png",
                        help="write the scan-focus-shift figure (S_v heatmap, regions, r*, expansion per layer)")
    parser.add_argument("--no-pad-to-square", action="store_true",
                        help="centre-crop like llava-hf's processor instead of the original LLaVA pad-to-square")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32",
                        help="parameter dtype (default float32)")
    parser.add_argument("--mesh", default=None, help=f"{sharding.MESH_HELP}; default: every device on the data axis "
                                                     f"when the model fits one device")
    parser.add_argument("--max-pixels", type=positive_int, default=None,
                        help="Qwen2.5-VL: pixel budget of the grid buckets the image is resized to (default: the "
                             "model's preprocessor_config.json)")
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    mode = args.mode or ("blink" if args.tokensr else "interp")

    try:
        args.model = resolve_model_dir(args.model)  # a directory or a Hugging Face Hub id, checked before the work
        image = load_image(args.image)
        blink, bank = blink_settings(mode, layers=args.layers, region_size=args.region_size, tau_exp=args.tau_exp,
                                     tau_drop=args.tau_drop, tokensr_dir=args.tokensr)
        if mode == "vanilla" and (args.tau_exp is not None or args.tau_drop is not None):
            print("note: --tau-exp/--tau-drop do nothing in --mode vanilla", file=sys.stderr)
        llava, processor = load_model_and_processor(args.model, dtype=args.dtype, mesh=args.mesh,
                                                    region_size=blink.region_size, max_pixels=args.max_pixels,
                                                    pad_to_square=not args.no_pad_to_square, load=load_pretrained)
        grid = processor.grid_of(image) if is_qwen(processor) else llava.config.vision.grid
        blink.validate_for(llava.config.text.num_hidden_layers, grid)
        if bank is not None:  # another model's TokenSR, named as eval.run names it (before any forward)
            check_tokensr(blink, llava.config.text.hidden_size, bank, args.tokensr)
        if mode == "crop" and is_qwen(processor):
            raise ConfigError("--mode crop is not available for Qwen2.5-VL: its second pass asks with the image and a "
                              "crop of another grid shape in one prompt; use vanilla, interp or blink")
        if mode == "crop":
            crop = CropConfig.like(blink, crop_layer=args.crop_layer, crop_context=args.crop_context,
                                   crop_input=args.crop_input)
            result = predict_crop(llava, processor, image, args.question, crop, max_new_tokens=args.max_new_tokens)
        else:
            result = predict(llava, processor, image, args.question, None if mode == "vanilla" else blink, bank,
                             max_new_tokens=args.max_new_tokens, scan_config=blink)
    except (ConfigError, ImageError, ProcessorError, CheckpointError, InputError, sharding.MeshError,
            FileNotFoundError) as e:
        raise SystemExit(f"error: {e}") from None

    if mode == "crop":
        print(f"answer: {result.answer}")
        print()
        print(f"crop ({crop.crop_input}; layer {crop.crop_layer}, region_size={crop.region_size}, context "
              f"{crop.crop_context}): box {result.crop_box} of the {image.width} x {image.height} image")
        print(format_trace(result.trace))
        if args.plot:
            plot_crop(result, np.asarray(image), args.plot, region_size=crop.region_size,
                      title=f"crop: {args.question}  \u2192  \"{result.answer}\"")
            print(f"wrote {args.plot}")
        return 0

    regions = blink.num_regions(grid)
    print(f"answer: {result.answer}")
    print()
    settings = (f"tau_exp={blink.tau_exp}, tau_drop={blink.tau_drop}, " if mode != "vanilla" else "")
    print(f"trace ({mode}; {settings}region_size={blink.region_size} -> {regions} regions):")
    print(format_trace(result.trace))
    if args.plot:
        title = f"{mode}: {args.question}  \u2192  \"{result.answer}\""
        plot_trace(display_image(result.pixel_values), result.trace, args.plot, region_size=blink.region_size,
                   title=title)
        print(f"wrote {args.plot}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
