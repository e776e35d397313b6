"""Plots of Blink's decisions (and the crop mode's crops) from a run's `--save-traces` files.

    python -m eval.report --run OUT_DIR [--mode blink] [--examples 12] [--report-dir OUT_DIR/report]

For each traces_<bench>_<mode>.jsonl in the run directory: how often each participating layer expands
(and how often SR tokens are present after it), the distribution of rho per layer beside tau_exp/tau_drop,
and a grid of example images with the regions each layer expanded. For the crop mode: its rho and crop sizes,
and a grid of original images with each question's crop box. Writes `<bench>_<mode>_*.png`, `report.json`
(the numbers) and `report.md` into the report directory.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterable, Mapping, Sequence
from pathlib import Path

import numpy as np
from PIL import Image

from blink_jax.blink.dtr import ACTION_NAMES, NO_REGION, region_box
from blink_jax.processing import preprocess_uint8
from eval.harness.io import atomic_write_json, atomic_write_text, read_jsonl

QUANTILES = (10, 25, 50, 75, 90)


def latest_traces(records: Iterable[dict]) -> list[dict]:
    """One record per question (the last, should a resumed run have written one twice)."""
    return list({r["question_id"]: r for r in records if "question_id" in r and "rho" in r}.values())


def layer_stats(records: Sequence[dict]) -> dict[int, dict]:
    """Per participating layer: action shares, share with SR tokens present after it, rho mean and quantiles."""
    if not records:
        return {}
    layers = records[0]["layers"]
    stats = {}
    for j, layer in enumerate(layers):
        rho = np.asarray([r["rho"][j] for r in records], np.float64)
        actions = [r["action"][j] for r in records]
        stats[int(layer)] = {
            "n": len(records),
            **{f"{a}_rate": actions.count(a) / len(records) for a in ACTION_NAMES},
            "sr_present_rate": sum(r["expanded_region"][j] != NO_REGION for r in records) / len(records),
            "rho_mean": float(rho.mean()),
            **{f"rho_p{q}": float(np.percentile(rho, q)) for q in QUANTILES},
        }
    return stats


def pick_examples(records: Sequence[dict], n: int) -> list[dict]:
    """Questions that expanded first (most expansions first), then the rest, in file order."""
    order = sorted(range(len(records)), key=lambda i: -records[i]["action"].count("expand"))
    return [records[i] for i in order[:n]]


def plot_expansions(stats: Mapping[int, dict], path: Path, title: str) -> None:
    import matplotlib.pyplot as plt

    layers = list(stats)
    x = np.arange(len(layers))
    fig, ax = plt.subplots(figsize=(max(4, 0.7 * len(layers) + 2), 3))
    ax.bar(x - 0.2, [stats[l]["expand_rate"] for l in layers], 0.4, label="expands at this layer")
    ax.bar(x + 0.2, [stats[l]["sr_present_rate"] for l in layers], 0.4, label="SR tokens after this layer")
    ax.set_xticks(x, [str(l) for l in layers])
    ax.set_xlabel("layer")
    ax.set_ylabel("share of questions")
    ax.set_ylim(0, 1)
    ax.set_title(title)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_rho(records: Sequence[dict], path: Path, title: str, tau_exp: float | None, tau_drop: float | None) -> None:
    import matplotlib.pyplot as plt

    layers = records[0]["layers"]
    data = [[r["rho"][j] for r in records] for j in range(len(layers))]
    fig, ax = plt.subplots(figsize=(max(4, 0.7 * len(layers) + 2), 3))
    ax.boxplot(data, showfliers=True)
    ax.set_xticks(np.arange(1, len(layers) + 1), [str(l) for l in layers])
    for value, name, style in ((tau_exp, "tau_exp", "--"), (tau_drop, "tau_drop", ":")):
        if value is not None:
            ax.axhline(value, linestyle=style, color="k", linewidth=1, label=f"{name} = {value:g}")
    ax.set_xlabel("layer")
    ax.set_ylabel("rho")
    ax.set_title(title)
    if tau_exp is not None or tau_drop is not None:
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_examples(examples: Sequence[tuple[dict, object]], path: Path, title: str) -> None:
    """examples: (trace record, PIL image or None); each expansion drawn as a box coloured by its layer."""
    import matplotlib.patches as patches
    import matplotlib.pyplot as plt

    cols = min(4, len(examples))
    rows = -(-len(examples) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3 * cols, 3.2 * rows), squeeze=False)
    cmap = plt.get_cmap("viridis")
    for ax in axes.flat:
        ax.axis("off")
    for ax, (rec, image) in zip(axes.flat, examples):
        if rec.get("cell"):  # Qwen2.5-VL: the image resized to its grid bucket (Gh, Gw) of `cell`-px merged tokens
            (height, width), grid, cell = rec["image_size"], tuple(rec["grid"]), rec["cell"]
            shown = (np.asarray(image.convert("RGB").resize((width, height), Image.Resampling.BICUBIC))
                     if image is not None else np.full((height, width, 3), 200, np.uint8))
        else:
            size = rec["image_size"]
            grid, cell = rec["grid"], size // rec["grid"]
            shown = (preprocess_uint8(image, image_size=size, pad_to_square=rec.get("pad_to_square", True))
                     if image is not None else np.full((size, size, 3), 200, np.uint8))
        ax.imshow(shown)
        layers = rec["layers"]
        for j, (action, region) in enumerate(zip(rec["action"], rec["region"])):
            if action != "expand":
                continue
            x0, y0, x1, y1 = region_box(region, grid, rec["region_size"], patch=cell)
            inset = 1.5 * j
            ax.add_patch(patches.Rectangle((x0 + inset, y0 + inset), x1 - x0 - 2 * inset, y1 - y0 - 2 * inset,
                                           fill=False, linewidth=2, edgecolor=cmap(j / max(1, len(layers) - 1))))
        expanded = [str(l) for l, a in zip(layers, rec["action"]) if a == "expand"]
        ax.set_title(f"{rec['question_id']}\nexpand at {','.join(expanded) or '-'}", fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def crop_stats(records: Sequence[dict]) -> dict:
    """The crop mode's pass 1: rho at its layer, and the crop's share of the original image's area."""
    rho = np.asarray([r["rho"] for r in records], np.float64)
    area = np.asarray([(r["box"][2] - r["box"][0]) * (r["box"][3] - r["box"][1])
                       / (r["original_size"][0] * r["original_size"][1]) for r in records], np.float64)
    return {"n": len(records), "crop_layer": records[0]["crop_layer"], "rho_mean": float(rho.mean()),
            **{f"rho_p{q}": float(np.percentile(rho, q)) for q in QUANTILES},
            "area_share_mean": float(area.mean()), "area_share_p50": float(np.percentile(area, 50))}


def plot_crops(examples: Sequence[tuple[dict, object]], path: Path, title: str) -> None:
    """examples: (crop trace record, PIL image or None); the crop box drawn on the original image."""
    import matplotlib.patches as patches
    import matplotlib.pyplot as plt

    cols = min(4, len(examples))
    rows = -(-len(examples) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(3 * cols, 3.2 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, (rec, image) in zip(axes.flat, examples):
        width, height = rec["original_size"]
        ax.imshow(np.asarray(image) if image is not None else np.full((height, width, 3), 200, np.uint8))
        x0, y0, x1, y1 = rec["box"]
        ax.add_patch(patches.Rectangle((x0 - 0.5, y0 - 0.5), x1 - x0, y1 - y0, fill=False, linewidth=2,
                                       edgecolor="yellow"))
        ax.set_title(f"{rec['question_id']}\nlayer {rec['crop_layer']}: \u03c1 = {rec['rho']:.3f}, r* = "
                     f"{rec['region']}", fontsize=7)
    fig.suptitle(title, fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def _crop_report(bench: str, name: str, label: str, config: Mapping, records: Sequence[dict], examples: int,
                 report_dir: Path, title: str) -> tuple[dict, list[str]]:
    stats = crop_stats(records)
    files = [report_dir / f"{bench}_{name}_crops.png"]
    chosen = list(records[:examples])
    plot_crops(list(zip(chosen, _images(bench, config, chosen))), files[0], title)
    lines = [f"## {label}", "", "| crop layer | rho mean | rho p10 | rho p50 | rho p90 | crop area (share of the "
             "image, mean) |", "|---|---|---|---|---|---|",
             f"| {stats['crop_layer']} | {stats['rho_mean']:.3f} | {stats['rho_p10']:.3f} | {stats['rho_p50']:.3f} | "
             f"{stats['rho_p90']:.3f} | {stats['area_share_mean']:.3f} |", ""]
    lines += [f"![{f.stem}]({f.name})" for f in files] + [""]
    return {"crop": stats, "files": [f.name for f in files]}, lines


def _images(bench_name: str, config: Mapping, records: Sequence[dict]) -> list:
    """PIL images of the records: from their file path, or from the benchmark's data (embedded images)."""
    from blink_jax.processing import load_image

    images: list = []
    docs = None
    for rec in records:
        try:
            if rec.get("image"):
                images.append(load_image(rec["image"]))
                continue
            if docs is None:
                from eval import benchmarks

                bench = benchmarks.get(bench_name)
                docs = {d["question_id"]: d for d in benchmarks.load_docs(bench, config["data_dir"],
                                                                            config.get("tfds_dir"))}
            images.append(bench.load_image(docs[rec["question_id"]], config["data_dir"]))
        except Exception:  # noqa: BLE001 - a missing image leaves a grey tile, not a failed report
            images.append(None)
    return images


def make_report(run_dir: str | Path, *, modes: Sequence[str] | None = None, examples: int = 12,
                report_dir: str | Path | None = None) -> dict:
    """Draws the plots for every traced mode of a run. -> {mode: {"layers": stats, "files": [...]}} ({"crop": stats,
    "files"} for the crop mode)."""
    run_dir = Path(run_dir)
    results = json.loads((run_dir / "results.json").read_text())
    bench, config = results["bench"], results["config"]
    report_dir = Path(report_dir) if report_dir else run_dir / "report"
    report_dir.mkdir(parents=True, exist_ok=True)
    out: dict = {}
    lines = [f"# Blink decisions: {results['title']}", ""]
    for name, mode in results["modes"].items():
        path = run_dir / f"traces_{bench}_{name}.jsonl"
        if (modes and name not in modes) or not path.exists():
            continue
        records = latest_traces(read_jsonl(path))
        if not records:
            continue
        title = f"{results['title']} — {mode['label']} ({len(records)} questions)"
        if "box" in records[0]:  # the crop mode
            out[name], more = _crop_report(bench, name, mode["label"], config, records, examples, report_dir, title)
            lines += more
            continue
        blink = mode["settings"].get("blink", {})
        stats = layer_stats(records)
        files = [report_dir / f"{bench}_{name}_expansions.png", report_dir / f"{bench}_{name}_rho.png",
                 report_dir / f"{bench}_{name}_examples.png"]
        plot_expansions(stats, files[0], title)
        plot_rho(records, files[1], title, blink.get("tau_exp"), blink.get("tau_drop"))
        chosen = pick_examples(records, examples)
        plot_examples(list(zip(chosen, _images(bench, config, chosen))), files[2], title)
        out[name] = {"layers": stats, "files": [f.name for f in files]}
        lines += [f"## {mode['label']}", "", "| layer | expand | keep | drop | SR present | rho mean | rho p10 | "
                  "rho p50 | rho p90 |", "|---|---|---|---|---|---|---|---|---|"]
        lines += [f"| {l} | {s['expand_rate']:.3f} | {s['keep_rate']:.3f} | {s['drop_rate']:.3f} | "
                  f"{s['sr_present_rate']:.3f} | {s['rho_mean']:.3f} | {s['rho_p10']:.3f} | {s['rho_p50']:.3f} | "
                  f"{s['rho_p90']:.3f} |" for l, s in stats.items()]
        lines += [""] + [f"![{f.stem}]({f.name})" for f in files] + [""]
    if not out:
        raise FileNotFoundError(f"{run_dir} has no traces_{bench}_<mode>.jsonl: rerun eval.run with --save-traces "
                                f"(and a Blink or crop mode)")
    atomic_write_json(report_dir / "report.json", out)
    atomic_write_text(report_dir / "report.md", "\n".join(lines))
    return out


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m eval.report", description=__doc__.split("\n\n")[0])
    p.add_argument("--run", required=True, help="an eval.run output directory (with --save-traces)")
    p.add_argument("--mode", action="append", help="only these modes (repeatable); default: every traced mode")
    p.add_argument("--examples", type=int, default=12, help="images in the example grid")
    p.add_argument("--report-dir", help="default: RUN/report")
    args = p.parse_args(argv)
    import matplotlib

    matplotlib.use("Agg")
    try:
        out = make_report(args.run, modes=args.mode, examples=args.examples, report_dir=args.report_dir)
    except FileNotFoundError as e:
        print(f"eval.report: {e}", file=sys.stderr)
        return 2
    for name, entry in out.items():
        if "crop" in entry:
            print(f"{name}: crops of {entry['crop']['area_share_mean']:.1%} of the image on average")
            continue
        print(f"{name}: " + ", ".join(f"layer {l} expands {s['expand_rate']:.1%}" for l, s in entry["layers"].items()))
    print(f"report: {args.report_dir or Path(args.run) / 'report'}/report.md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
