"""`BlinkConfig`: every knob of the Blink method, named as in BLINK.md.

A jitted forward must not recompile when a threshold changes, so the config splits in two:

    static, thresholds = cfg.split()
    forward = jax.jit(forward_fn, static_argnames="static")
    forward(params, inputs, thresholds, static=static)

- `BlinkStatic` (hashable; pass it as a static argument): everything that shapes the program —
  layers, region size, scale, drop/re-expand policy, ablation switches. Generated from `BlinkConfig`'s
  fields less the thresholds, so it has no `tau_*` field and code under jit cannot read a threshold as a
  Python constant by mistake.
- `Thresholds(tau_exp, tau_drop)`: a NamedTuple pytree of float32 arrays, traced. Scalars by default;
  arrays of shape [B] also work (every DTR comparison broadcasts), for per-example thresholds.

`tau_exp > 1` disables expansion (rho <= 1 always), which makes Blink exactly vanilla LLaVA.
"""

from __future__ import annotations

import argparse
import dataclasses
import math
import numbers
import re
from typing import NamedTuple

import jax
import jax.numpy as jnp

from blink_jax.config import ConfigError

REEXPAND = ("refocus", "hold")
TOKENSR_KINDS = ("interp", "conv", "mlp")  # their modules: `tokensr.KINDS`
REGION_CHOICES = ("saliency", "random")
EXPANSIONS = ("dynamic", "fixed")
SR_POSITIONS = ("source", "fractional")
# The §6 ablations; `ablation(name)` maps each to a config change.
ABLATIONS = ("full", "random", "fixed", "no-drop", "high-tau")
HIGH_TAU_EXP = 0.45  # (ours) the "high tau_exp" ablation: 1.5x the default 0.30


class Thresholds(NamedTuple):
    """Traced DTR thresholds: float32 scalars (or [B] arrays for per-example thresholds)."""

    tau_exp: jax.Array
    tau_drop: jax.Array


def grid_shape(grid: int | tuple[int, int]) -> tuple[int, int]:
    """A visual grid as (Gh, Gw): an int G is the square G x G grid (LLaVA-1.5's 24), a pair is (Gh, Gw)."""
    if isinstance(grid, numbers.Integral) and not isinstance(grid, bool):
        return int(grid), int(grid)
    if isinstance(grid, (tuple, list)) and len(grid) == 2 and all(isinstance(g, numbers.Integral) for g in grid):
        return int(grid[0]), int(grid[1])
    raise ValueError(f"visual grid {grid!r} is neither a side G nor a pair (Gh, Gw) of ints")


def _check_choice(field: str, value, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"BlinkConfig.{field}={value!r} is unknown; use one of {choices}")


def _validate_static(cfg) -> None:
    """Checks of the static fields, run by `BlinkConfig` and `BlinkStatic` (normalises `layers` to a tuple of ints)."""
    layers = tuple(int(l) for l in cfg.layers)
    object.__setattr__(cfg, "layers", layers)
    if not layers:
        raise ConfigError("BlinkConfig.layers=() is empty; give at least one participating layer, e.g. (12, ..., 18)")
    if list(layers) != sorted(set(layers)):
        raise ConfigError(
            f"BlinkConfig.layers={layers} must be sorted and unique; use {tuple(sorted(set(layers)))}"
        )
    if layers[0] < 0:
        raise ConfigError(f"BlinkConfig.layers={layers} has a negative index; layer indices count from 0")
    for field in ("region_size", "scale", "tokensr_channels"):
        value = getattr(cfg, field)
        if not isinstance(value, numbers.Integral) or isinstance(value, bool) or value <= 0:
            raise ConfigError(f"BlinkConfig.{field}={value!r} must be a positive int")
    _check_choice("reexpand", cfg.reexpand, REEXPAND)
    _check_choice("tokensr_kind", cfg.tokensr_kind, TOKENSR_KINDS)
    _check_choice("region_choice", cfg.region_choice, REGION_CHOICES)
    _check_choice("expansion", cfg.expansion, EXPANSIONS)
    _check_choice("sr_positions", cfg.sr_positions, SR_POSITIONS)


class _Derived:
    """Sizes, ablation switches and model-dependent validation read from the fields (both config classes)."""

    layers: tuple[int, ...]
    region_size: int
    scale: int
    region_choice: str
    expansion: str

    @property
    def sr_side(self) -> int:
        """Side of the SR grid: s * r."""
        return self.scale * self.region_size

    @property
    def num_sr_tokens(self) -> int:
        """SR tokens per expansion: (s * r)^2 (144 with the defaults)."""
        return self.sr_side**2

    def num_regions(self, grid: int | tuple[int, int]) -> int:
        """R = (Gh / r) (Gw / r) regions on a Gh x Gw visual grid, or G x G for an int (16 for LLaVA-1.5's 24 x 24
        with r = 6)."""
        gh, gw = grid_shape(grid)
        return (gh // self.region_size) * (gw // self.region_size)

    @property
    def fixed(self) -> bool:
        """The w/o-DTR ablation: expand at every participating layer regardless of rho."""
        return self.expansion == "fixed"

    @property
    def random_region(self) -> bool:
        """The w/o-SGS ablation: expand a uniformly random region instead of r*."""
        return self.region_choice == "random"

    def validate_for(self, num_layers: int, grid: int | tuple[int, int]) -> None:
        """Raise `ConfigError` if this config cannot run on a model with `num_layers` and a G x G grid (an int)
        or a Gh x Gw grid (a pair)."""
        problems = []  # all of them at once, so a user fixes them in one go
        bad = [l for l in self.layers if l >= num_layers]
        if bad:
            problems.append(f"BlinkConfig.layers={self.layers} has layer index {bad[0]} but the language model has "
                            f"{num_layers} layers (0..{num_layers - 1}); give layers below {num_layers}")
        gh, gw = grid_shape(grid)
        if gh % self.region_size or gw % self.region_size:
            side = math.gcd(gh, gw)
            divisors = [d for d in range(1, side + 1) if side % d == 0]
            if gh == gw:
                problems.append(f"BlinkConfig.region_size={self.region_size} does not divide the visual grid side "
                                f"{gh}; use a divisor of {gh}: {divisors}")
            else:
                problems.append(f"BlinkConfig.region_size={self.region_size} does not divide both sides of the visual "
                                f"grid {gh} x {gw}; use a common divisor: {divisors}")
        if problems:
            raise ConfigError("; and ".join(problems))


@dataclasses.dataclass(frozen=True)
class BlinkConfig(_Derived):
    """Blink's knobs (BLINK.md §2-4, §6). Defaults are the spec's for LLaVA-1.5-7B (other backbone sizes:
    `BlinkConfig.for_model`); see `split()` for use under jit.

    layers: participating layers of the language model (decisions taken from layer L act on L+1).
    region_size: r, regions are r x r visual tokens; r must divide the grid side G.
    scale: s, TokenSR upsampling factor; an expansion adds (s r)^2 SR tokens.
    tau_exp / tau_drop: expand when rho > tau_exp; drop an expansion when rho < tau_drop.
      `tau_exp > 1` disables expansion.
    drop: False is the "w/o Drop" ablation (SR tokens stay to the end once expanded).
    reexpand: when already expanded and rho > tau_exp: "refocus" replaces the SR tokens with the new
      region's, "hold" keeps the old ones.
    tokensr_kind: "interp" (Blink-interp, no parameters), "conv" (Blink, trained) or "mlp" (Blink with a
      per-token MLP residual instead of convolutions, trained).
    tokensr_channels: bottleneck C of the trained TokenSR.
    region_choice: "saliency" (r*) or "random" (the w/o-SGS ablation; rho still decides *whether*).
    expansion: "dynamic" or "fixed" (the w/o-DTR ablation).
    return_attention: the trace carries S_v per layer.
    sr_positions: under M-RoPE (Qwen2.5-VL), an SR token's (t, h, w) position is its source token's ("source") or
      offset to its fine cell's centre, h + (i mod s + 0.5) / s - 0.5 and likewise w ("fractional", BLINK.md §10);
      1-D positions (LLaVA) take "source" only.
    """

    layers: tuple[int, ...] = (12, 13, 14, 15, 16, 17, 18)
    region_size: int = 6
    scale: int = 2
    tau_exp: float = 0.30
    tau_drop: float = 0.15
    drop: bool = True
    reexpand: str = "refocus"
    tokensr_kind: str = "interp"
    tokensr_channels: int = 512
    region_choice: str = "saliency"
    expansion: str = "dynamic"
    return_attention: bool = False
    sr_positions: str = "source"

    def __post_init__(self):
        _validate_static(self)
        for field in THRESHOLD_FIELDS:
            value = getattr(self, field)
            if not isinstance(value, numbers.Real) or not value >= 0:  # `not >=` also catches NaN
                raise ConfigError(f"BlinkConfig.{field}={value!r} must be a non-negative number")
        if self.tau_drop > self.tau_exp:
            raise ConfigError(
                f"BlinkConfig.tau_drop={self.tau_drop} is above tau_exp={self.tau_exp}; "
                f"set tau_drop <= tau_exp (defaults 0.15 <= 0.30)"
            )

    def ablation(self, name: str) -> "BlinkConfig":
        """This config with one §6 ablation applied: "full" | "random" | "fixed" | "no-drop" | "high-tau"."""
        changes = {
            "full": {},
            "random": {"region_choice": "random"},
            "fixed": {"expansion": "fixed"},
            "no-drop": {"drop": False},
            "high-tau": {"tau_exp": max(self.tau_exp, HIGH_TAU_EXP)},
        }
        if name not in changes:
            raise ConfigError(f"Blink ablation {name!r} is unknown; use one of {ABLATIONS}")
        return dataclasses.replace(self, **changes[name])

    def static_part(self) -> "BlinkStatic":
        """Everything but the thresholds: hashable, for `static_argnames`."""
        return BlinkStatic(**{f.name: getattr(self, f.name) for f in dataclasses.fields(BlinkStatic)})

    def thresholds(self) -> Thresholds:
        """(tau_exp, tau_drop) as float32 scalar arrays, to pass traced."""
        return Thresholds(jnp.asarray(self.tau_exp, jnp.float32), jnp.asarray(self.tau_drop, jnp.float32))

    def split(self) -> tuple["BlinkStatic", Thresholds]:
        return self.static_part(), self.thresholds()

    @classmethod
    def for_model(cls, model_config, **overrides) -> "BlinkConfig":
        """The default config of a backbone (`LlavaConfig`, `Qwen25VLConfig`: anything with `text.num_hidden_layers`
        and `text.hidden_size`) from `PRESETS`, with `overrides` (any field) on top. A model of no known size needs
        `layers` and `region_size` in `overrides`; otherwise it is a `ConfigError` naming the known sizes."""
        text = model_config.text
        size = (text.num_hidden_layers, text.hidden_size)
        preset = next((p for p in PRESETS if (p.num_layers, p.hidden_size) == size), None)
        if preset is None:
            if not {"layers", "region_size"} <= overrides.keys():
                known = ", ".join(f"{p.name} ({p.num_layers} layers x {p.hidden_size})" for p in PRESETS)
                raise ConfigError(f"no default Blink config for a language model of {size[0]} layers x {size[1]} "
                                  f"wide (known: {known}): give layers= and region_size= (--layers, --region-size) "
                                  f"explicitly")
            return cls(**overrides)
        return cls(**{"layers": preset.layers, "region_size": preset.region_size, **overrides})

    @classmethod
    def default_for(cls, model_config) -> "BlinkConfig":
        """The defaults for this backbone: its size's preset (`for_model`) when `PRESETS` has one, else the
        paper's (`BlinkConfig()`: LLaVA-1.5-7B's layers 12-18, r = 6)."""
        try:
            return cls.for_model(model_config)
        except ConfigError:
            return cls()


THRESHOLD_FIELDS = Thresholds._fields  # the traced fields: BlinkConfig's, left out of BlinkStatic


def _with_thresholds(self, tau_exp: float, tau_drop: float) -> BlinkConfig:
    """The full config: this static part with thresholds."""
    return BlinkConfig(tau_exp=tau_exp, tau_drop=tau_drop, **{f.name: getattr(self, f.name)
                                                              for f in dataclasses.fields(self)})


# The hashable, threshold-free part of `BlinkConfig`, a static argument of the jitted forward. Generated
# from BlinkConfig's fields (same names, types, defaults and order, less THRESHOLD_FIELDS), so a field
# added to BlinkConfig reaches the jitted code without being written twice.
BlinkStatic = dataclasses.make_dataclass(
    "BlinkStatic",
    [(f.name, f.type, dataclasses.field(default=f.default))
     for f in dataclasses.fields(BlinkConfig) if f.name not in THRESHOLD_FIELDS],
    bases=(_Derived,),
    frozen=True,
    namespace={"__doc__": "The hashable, threshold-free part of `BlinkConfig` (`cfg.split()[0]`): a static "
                          "argument of the jitted forward. No `tau_*` field, so code under jit cannot read a "
                          "threshold as a Python constant.",
               "__post_init__": _validate_static, "with_thresholds": _with_thresholds},
)
BlinkStatic.__module__ = __name__


@dataclasses.dataclass(frozen=True)
class BlinkPreset:
    """A backbone size's default participating layers and region size, found by its language model's depth and
    width (`BlinkConfig.for_model`)."""
    name: str
    num_layers: int
    hidden_size: int
    layers: tuple[int, ...]
    region_size: int


# Defaults per backbone size; everything else is BlinkConfig's default (tau_exp 0.30, tau_drop 0.15, s = 2).
# - LLaVA-1.5-7B: the paper's, BlinkConfig's own defaults (layers 12-18 of 32, r = 6 on the 24 x 24 grid).
# - Qwen2.5-VL (BLINK.md §10: "the middle quarter of the decoder", silent on which quarter and on r) (ours): a quarter
#   of the depth, placed so that its centre sits at LLaVA-7B's relative depth ((15 + 0.5) / 32 = 0.484): 7B,
#   28 layers: 10-16 (7 layers, centre 0.482); 3B, 36 layers: 13-21 (9 layers, centre 0.486). r = 6 as for LLaVA:
#   36 merged tokens per region and (s r)^2 = 144 SR tokens per expansion, the paper's TokenSR geometry; the grid
#   buckets are multiples of 6 (`grid_buckets(..., multiple=6)`). Calibrate the thresholds per model.
PRESETS: tuple[BlinkPreset, ...] = (
    BlinkPreset("llava-1.5-7b", 32, 4096, BlinkConfig().layers, BlinkConfig().region_size),
    BlinkPreset("qwen2.5-vl-7b", 28, 3584, tuple(range(10, 17)), 6),
    BlinkPreset("qwen2.5-vl-3b", 36, 2048, tuple(range(13, 22)), 6),
)


# Command-line flags of the BlinkConfig fields, for errors shown to a command's user.
FLAGS = {"layers": "--layers", "region_size": "--region-size", "scale": "--scale", "tau_exp": "--tau-exp",
         "tau_drop": "--tau-drop", "tokensr_channels": "--channels"}


def in_flag_terms(message: str) -> str:
    """A BlinkConfig error as a command's user reads it: `BlinkConfig.region_size=6` -> `--region-size 6`."""
    return re.sub(r"BlinkConfig\.(\w+)=", lambda m: f"{FLAGS[m.group(1)]} " if m.group(1) in FLAGS else m.group(0),
                  message)


def parse_layers(text: str) -> tuple[int, ...]:
    """A --layers value: "12-18" or "1,2,5" or "1-3,7" -> the sorted, unique layer indices."""
    layers: list[int] = []
    try:
        for part in text.split(","):
            part = part.strip()
            if "-" in part:
                lo, hi = part.split("-")
                layers.extend(range(int(lo), int(hi) + 1))
            elif part:
                layers.append(int(part))
    except ValueError:
        raise ConfigError(f"--layers {text!r} is not a list of layer indices: write e.g. 12-18 or 1,2") from None
    if not layers:
        raise ConfigError(f"--layers {text!r} names no layer: write e.g. 12-18 or 1,2")
    return tuple(sorted(set(layers)))


def layers_argument(text: str) -> tuple[int, ...]:
    """`parse_layers` as an argparse `type=`: its error becomes argparse's usage error, message kept."""
    try:
        return parse_layers(text)
    except ConfigError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
