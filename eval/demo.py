"""The bundled demo: what `python -m eval.run --bench pope` runs when no --model is given.

`demo/` holds a small LLaVA-1.5 trained here on procedurally drawn shapes (`demo/MODEL_CARD.md` says how), its
trained TokenSR and a POPE-format eval set of the same task. Paths are relative to the repository, so the demo
works from any working directory.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1] / "demo"


@dataclasses.dataclass(frozen=True)
class Demo:
    model: Path = ROOT / "model"  # Hugging Face LLaVA directory
    tokensr: Path = ROOT / "tokensr"  # `python -m train.tokensr` export (its tokensr.json holds the Blink config)
    data_dirs: tuple[tuple[str, Path], ...] = (("pope", ROOT / "data" / "pope"),)  # bench -> release-format data
    dtype: str = "float32"  # the precision its card reports
    # vanilla, the two-pass crop baseline (BLINK.md §9), Blink-interp and Blink: the four-way comparison
    modes: tuple[str, ...] = ("vanilla", "crop", "interp", "blink")
    # The backbone was trained on one image per prompt, so its crop mode shows it the crop alone (MODEL_CARD.md).
    crop_input: str = "crop"
    # Blink thresholds: BLINK.md's defaults for R = 16 regions (MODEL_CARD.md also reports calibrated ones).
    tau_exp: float = 0.30
    tau_drop: float = 0.15
    batch_size: int = 16
    out: str = "eval_out/pope_demo"

    def data_dir(self, bench: str) -> Path | None:
        return dict(self.data_dirs).get(bench)

    def missing(self) -> list[Path]:
        """Bundled paths that are not there (e.g. a checkout without them)."""
        paths = [self.model / "config.json", self.tokensr / "tokensr.json"]
        paths += [d / "coco_pope_random.json" for _, d in self.data_dirs]
        return [p for p in paths if not p.exists()]


DEMO = Demo()
