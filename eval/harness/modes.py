"""The ways a run answers: the paper's three (vanilla, Blink-interp with training-free TokenSR, Blink with trained
TokenSR) and the two-pass crop baseline Blink claims to replace (BLINK.md §9).

    vanilla  no Blink
    interp   BlinkConfig(tokensr_kind="interp"), with the layers/region size/thresholds of the trained TokenSR
             when `--tokensr` is given, else the BlinkConfig defaults; `--layers`, `--region-size`,
             `--tau-exp`, `--tau-drop` override
    blink    the trained TokenSR of `--tokensr` and the config it was trained with; thresholds may be overridden
             (layers and region size are fixed by the trained modules)
    crop     `CropConfig`: pass 1 to `--crop-layer` (default: the middle of Blink's layers, those of `--tokensr`
             or `--layers`), the region of Blink's region size, grown by `--crop-context`; pass 2 on
             `--crop-input` both (image, then crop) or crop

`--ablation NAME` applies `BlinkConfig.ablation(NAME)` to interp and blink; their file names get "-NAME" (vanilla's
and crop's do not: the ablations are Blink's).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Any

from blink_jax.blink import ABLATIONS, BlinkConfig, CropConfig
from blink_jax.blink.tokensr import check_geometry
from blink_jax.config import ConfigError
from eval.harness.paper import KIND_LABELS, KINDS


class ModeError(ValueError):
    """A mode that cannot be set up from the given options: names the option and the fix."""


@dataclasses.dataclass(frozen=True)
class ModeSpec:
    kind: str  # "vanilla" | "interp" | "blink" | "crop"
    blink: BlinkConfig | None = None
    crop: CropConfig | None = None  # kind "crop"
    tokensr: Any = None  # the trained TokenSRBank for kind "blink"
    ablation: str | None = None
    tokensr_sha256: str | None = None  # `checkpoint.fingerprint(tokensr)`: which trained weights answered

    @property
    def name(self) -> str:
        """Key in file names and results: "blink", "interp-fixed", ..."""
        plain = self.ablation in (None, "full") or self.kind in ("vanilla", "crop")
        return self.kind if plain else f"{self.kind}-{self.ablation}"

    @property
    def label(self) -> str:
        base = KIND_LABELS[self.kind]
        return base if self.name == self.kind else f"{base} ({self.ablation})"

    def settings(self) -> dict:
        """What decides this mode's predictions, as JSON (for results.json and the resume check)."""
        if self.crop is not None:
            return {"kind": self.kind, "crop": dataclasses.asdict(self.crop)}
        if self.blink is None:
            return {"kind": self.kind}
        settings = {"kind": self.kind, "ablation": self.ablation, "blink": dataclasses.asdict(self.blink)}
        if self.tokensr_sha256 is not None:  # another checkpoint of the same geometry must not resume this run
            settings["tokensr_sha256"] = self.tokensr_sha256
        return settings


def build_modes(kinds: Sequence[str], *, tokensr_dir: str | None = None, ablation: str | None = None,
                layers: tuple[int, ...] | None = None, region_size: int | None = None,
                tau_exp: float | None = None, tau_drop: float | None = None, crop_layer: int | None = None,
                crop_context: float | None = None, crop_input: str | None = None,
                default: BlinkConfig | None = None) -> list[ModeSpec]:
    """ModeSpecs for `kinds` (in the order given). Without trained TokenSR, interp and crop start from `default`
    (the model's `BlinkConfig.default_for`; None: `BlinkConfig()`), then the flags."""
    unknown = [k for k in kinds if k not in KINDS]
    if unknown:
        raise ModeError(f"mode {unknown[0]!r} is unknown; use any of {', '.join(KINDS)} (comma-separated)")
    if ablation is not None and ablation not in ABLATIONS:
        raise ModeError(f"--ablation {ablation!r} is unknown; use one of {', '.join(a for a in ABLATIONS if a != 'full')}")
    if "blink" in kinds and tokensr_dir is None:
        raise ModeError("mode 'blink' needs trained TokenSR: pass --tokensr DIR (the directory `python -m "
                        "train.tokensr` exports), or run --modes vanilla,interp")
    bank, trained = None, None
    default = default if default is not None else BlinkConfig()
    if tokensr_dir is not None and {"blink", "interp", "crop"} & set(kinds):
        from blink_jax.blink.checkpoint import fingerprint, load_tokensr

        bank, trained = load_tokensr(tokensr_dir)
    thresholds = {k: v for k, v in (("tau_exp", tau_exp), ("tau_drop", tau_drop)) if v is not None}
    geometry = {k: v for k, v in (("layers", layers), ("region_size", region_size)) if v is not None}

    def finish(cfg: BlinkConfig) -> BlinkConfig:
        cfg = dataclasses.replace(cfg, **thresholds)
        return cfg.ablation(ablation) if ablation else cfg

    specs = []
    for kind in kinds:
        if kind == "vanilla":
            specs.append(ModeSpec("vanilla"))
        elif kind == "crop":
            base = dataclasses.replace(trained if trained is not None else default, **geometry)
            try:
                crop = CropConfig.like(base, crop_layer=crop_layer, crop_context=crop_context, crop_input=crop_input)
            except ConfigError as e:
                raise ModeError(f"mode 'crop': {e} (set by --crop-layer / --crop-context / --crop-input)") from None
            specs.append(ModeSpec("crop", crop=crop))
        elif kind == "interp":
            base = trained if trained is not None else default
            specs.append(ModeSpec("interp", finish(dataclasses.replace(base, tokensr_kind="interp", **geometry)),
                                  ablation=ablation))
        else:
            for field, value in geometry.items():
                if getattr(trained, field) != value:
                    raise ModeError(f"--{field.replace('_', '-')} {value} differs from the trained TokenSR's "
                                    f"{field}={getattr(trained, field)} ({tokensr_dir}): leave it out for mode "
                                    f"'blink', or train TokenSR for it")
            specs.append(ModeSpec("blink", finish(trained), tokensr=bank, ablation=ablation,
                                  tokensr_sha256=fingerprint(bank)))
    return specs


def check_fit(modes: Sequence[ModeSpec], *, num_layers: int, grid: int, hidden_size: int,
              tokensr_dir: str | None = None) -> None:
    """Every Blink mode can run on this model (layers, region size, TokenSR width), checked before any runs:
    a `ModeError` names where the mismatched value came from (--tokensr or the flags) and the fix."""
    for mode in modes:
        if mode.crop is not None:
            try:
                mode.crop.validate_for(num_layers, grid)
            except ConfigError as e:
                raise ModeError(f"mode 'crop': {e} (the value comes from --crop-layer, or the middle of Blink's "
                                f"layers: pass --crop-layer / --region-size that fit this model)") from None
        if mode.blink is None:
            continue
        trained = mode.kind == "blink"
        source = (f"the trained TokenSR of --tokensr {tokensr_dir}" if trained else
                  "--layers / --region-size (for interp, taken from --tokensr when not given)" if tokensr_dir else
                  "--layers / --region-size (BlinkConfig's defaults are for the 32-layer LLaVA-1.5-7B)")
        try:
            mode.blink.validate_for(num_layers, grid)
        except ConfigError as e:
            fix = "train TokenSR for this model" if trained else "pass --layers and --region-size that fit it"
            raise ModeError(f"mode {mode.name!r}: {e} (the value comes from {source}; {fix})") from None
        if trained:
            try:  # the check a forward pass makes (width, layers, geometry), before any mode runs
                check_geometry(mode.blink, hidden_size, mode.tokensr)
            except ValueError as e:
                raise ModeError(f"mode 'blink': --tokensr {tokensr_dir}: {e}") from None
