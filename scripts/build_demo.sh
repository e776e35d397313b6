#!/usr/bin/env bash
# Rebuilds the bundled demo (demo/MODEL_CARD.md) from scratch on a CPU: the backbone (one run, about 26 min on 2
# cores; the whole script about 45) and its POPE-format eval set, TokenSR training data, TokenSR (the normal
# `python -m train.tokensr` path), then the four-way eval (vanilla / crop / Blink-interp / Blink), the BLINK.md §6
# ablations, calibrated thresholds, the per-size breakdown, the zoom measurement, the oracle TokenSR and the patch
# probe. Deterministic from the seeds below on the same code and software. WORK holds the intermediate files
# (default a temporary directory); demo/ receives what ships.
set -euo pipefail
cd "$(dirname "$0")/.."
export JAX_PLATFORMS="${JAX_PLATFORMS:-cpu}"
WORK="${WORK:-$(mktemp -d)}"
echo "intermediate files in $WORK"
# The demo's world, for every command that draws scenes (the backbone's, its eval set's and the sets below).
WORLD=(--checked --shape square)

# 1. Backbone from scratch in one run, in the world of one shape with checks (`--checked --shape square`: every
#    object a square, so only colour tells objects apart; red, green and blue ones are fine checks, which the 2x
#    downsampling averages to grey on the small ones, so only a zoom reads a small check's colour): the vision tower
#    first, then the decoder, whose first steps see scenes of one or two squares (`--easy-steps`), 60% of its views
#    zoomed, and half the "no" questions about a present check's other colours (`--p-sibling`). Written as a Hugging
#    Face directory, plus the POPE-format eval set of that world.
python -m train.demo_backbone --out demo/model --pope-out demo/data/pope --seed 0 "${WORLD[@]}" \
  --vision-steps 500 --steps 1500 --easy-steps 400 --p-zoom 0.6 --p-sibling 0.5 --name-weight 0.5 --no-progress

# 2. TokenSR training data in the LLaVA-1.5 mix layout (scenes the backbone never saw).
python -m demo.shapes "${WORLD[@]}" --format llava-mix --out "$WORK/mix" --images 1024 --seed 0

# 3. TokenSR on the frozen demo backbone, Blink geometry for a 6-layer decoder and a 12x12 grid.
python -m train.tokensr --model demo/model --data-dir "$WORK/mix" --workdir "$WORK/tokensr" --mesh cpu \
  --layers 1-3 --region-size 3 --scale 2 --channels 128 --batch-size 16 --steps 300 --lr 1e-3 \
  --warmup-steps 20 --save-every 100 --max-prompt-len 256 --no-progress
rm -rf demo/tokensr && cp -r "$WORK/tokensr/tokensr" demo/tokensr
cp "$WORK/tokensr/metrics.jsonl" demo/tokensr/train_metrics.jsonl
cp "$WORK/tokensr/config.json" demo/tokensr/train_config.json

# 3b. The same with the mlp TokenSR kind (per-token dense layers instead of convolutions; docs/ARCHITECTURE.md).
python -m train.tokensr --model demo/model --data-dir "$WORK/mix" --workdir "$WORK/tokensr_mlp" --mesh cpu --kind mlp \
  --layers 1-3 --region-size 3 --scale 2 --channels 128 --batch-size 16 --steps 300 --lr 1e-3 \
  --warmup-steps 20 --save-every 100 --max-prompt-len 256 --no-progress
rm -rf demo/tokensr_mlp && cp -r "$WORK/tokensr_mlp/tokensr" demo/tokensr_mlp
cp "$WORK/tokensr_mlp/metrics.jsonl" demo/tokensr_mlp/train_metrics.jsonl
cp "$WORK/tokensr_mlp/config.json" demo/tokensr_mlp/train_config.json

# 4. The four modes on the bundled data (what `python -m eval.run --bench pope` does with no arguments), then
#    the BLINK.md §6 ablations of interp and Blink as more rows of the same results.md, and the breakdown.
python -m eval.run --bench pope --out "$WORK/eval" --save-traces --no-progress
for ablation in random fixed no-drop high-tau; do
  python -m eval.run --bench pope --out "$WORK/eval" --modes interp,blink --ablation "$ablation" --no-progress
done
python -m train.demo.breakdown --run "$WORK/eval"

# 5. Thresholds calibrated on another shapes set (seed 1, not the eval scenes), then Blink with them.
python -m demo.shapes "${WORLD[@]}" --out "$WORK/calib" --images 150 --seed 1
python -m eval.calibrate --model demo/model --data "$WORK/calib/coco_pope_random.json" \
  --image-folder "$WORK/calib/val2014" --layers 1-3 --region-size 3 --out "$WORK/calib.json" --no-progress
read -r TAU_EXP TAU_DROP < <(python -c "import json,sys; s=json.load(open(sys.argv[1]))['statistics']['suggested']; \
print(round(s['tau_exp'], 2), round(s['tau_drop'], 2))" "$WORK/calib.json")
python -m eval.run --bench pope --out "$WORK/eval_calibrated" --modes interp,blink --tau-exp "$TAU_EXP" \
  --tau-drop "$TAU_DROP" --save-traces --no-progress
python -m train.demo.breakdown --run "$WORK/eval_calibrated"

# 5b. The premise at four zooms (2x to 6x) on 1000 fresh scenes, and the crop mode at 6x on the eval set.
python -m demo.shapes "${WORLD[@]}" --out "$WORK/zoom" --images 1000 --seed 2
python -m train.demo.zoom --data-dir "$WORK/zoom" --out "$WORK/zoom.json" --no-progress
python -m eval.run --bench pope --modes vanilla,crop --region-size 2 --crop-context 1 --out "$WORK/eval_crop6" \
  --no-progress
python -m train.demo.breakdown --run "$WORK/eval_crop6"

# 6. Blink with the mlp TokenSR.
python -m eval.run --bench pope --tokensr demo/tokensr_mlp --modes blink --out "$WORK/eval_mlp" --no-progress

# 7. The oracle TokenSR: Blink with the teacher's own states as its SR tokens (what TokenSR's training aims at).
python -m train.demo.oracle --out "$WORK/oracle.json"

# 8. What the vision tower reads of the checks: its patch probe, full scene against the 2x crop.
python -m train.demo.probe --out "$WORK/probe.json" --no-progress
