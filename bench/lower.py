"""Every program of blink-jax lowered for the real targets with `jax.export`, and what each chip must hold.

    python -m bench.lower [--sizes 7b,13b] [--presets tpu_v4_8,tpu_v5e_8,gpu_8] [--platforms tpu,cuda]
                          [--batch 1,8,32] [--export-batch 8] [--train-batch 16] [--length 650]
                          [--new-tokens 16]

Programs: the vanilla prefill and Blink's prefill (`blink_jax.runtime._prefill`, logits at every prompt
position, as `Llava.__call__` runs them), one decode step (`blink_jax.model.forward.decode_step` against a cache
of `length + new tokens` slots) and the TokenSR train step (`blink_jax.training.step`, as `train.tokensr` builds it). The
parameters are abstract (`ShapeDtypeStruct`, bfloat16) with the NamedShardings `blink_jax.sharding` gives them on
the preset's mesh; the inputs are split over the batch axes. The meshes are made of simulated host CPU devices
(`main` sets XLA_FLAGS=--xla_force_host_platform_device_count before JAX starts its CPU backend): exporting needs
the mesh's axes, not its chips. The platform a program is exported for chooses its kernels
(`blink_jax.model.ops.attention` through `jax.lax.platform_dependent`), never the CPU this runs on.

Memory per device (`eval_memory`, Blink's generation at eval batch 1, 8 and 32, the larger of the two modes):
parameters exactly, from the shardings (the bytes of each parameter's shard); the KV cache and the largest
activations analytically, from the shapes, as `eval_memory` says. XLA's `memory_analysis()` of the programs
compiled for this host's CPU devices checks the arguments: the decode step's (language-model parameters, tokens,
KV cache) must be what the shardings give, byte for byte. Its temporaries are not used: they describe the CPU
program (blocked attention, bfloat16 weights widened to float32 for CPU matmuls), not the TPU's or GPU's.
"""

from __future__ import annotations

import argparse
import dataclasses
import functools
import math
import os
import sys
import time

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import NamedSharding

from bench import common
from bench.accelerator import default_layers
from blink_jax import runtime, sharding
from blink_jax.blink import BlinkConfig, runner
from blink_jax.config import LlavaConfig
from blink_jax.model import forward
from blink_jax.model.decoder import KVCache
from blink_jax.training import step as train_step
from blink_jax.training.optim import OptimConfig
from blink_jax.weights.params import abstract_model, path_str

GiB = 1024 ** 3
# Memory of one chip of each preset (vendor data sheets): a v4 chip 32 GiB HBM, a v5e chip 16 GiB, an H100 80 GiB.
CHIP = {"tpu_v4_8": ("TPU v4", 32 * GiB), "tpu_v5e_8": ("TPU v5e", 16 * GiB), "gpu_8": ("H100", 80 * GiB)}
# A model is said to be held at a batch when the estimate stays under this share of the chip: XLA's temporaries
# of fusions and collectives and the runtime take the rest (JAX on GPU preallocates 75% by default: raise
# XLA_PYTHON_CLIENT_MEM_FRACTION to use more).
USABLE = 0.9
PLATFORMS = ("tpu", "cuda", "rocm", "cpu")  # jax.export's names


def simulate_host_devices(count: int) -> list[jax.Device]:
    """`count` CPU devices to build meshes on. Must run before JAX starts its CPU backend (the flag is read then)."""
    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_force_host_platform_device_count" not in flags:
        os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={count}".strip()
    jax.config.update("jax_platforms", "cpu")
    devices = jax.devices("cpu")
    if len(devices) < count:
        raise SystemExit(f"bench.lower needs {count} host CPU devices for its meshes but JAX shows {len(devices)}: "
                         f"set XLA_FLAGS=--xla_force_host_platform_device_count={count} before JAX starts")
    return devices


def preset_mesh(name: str, devices) -> jax.sharding.Mesh:
    """The preset's mesh axes over host CPU devices (its platform is the export's, not the mesh's)."""
    preset = sharding.PRESETS[name]
    spec = ",".join(f"{axis}:{n}" for axis, n in preset.axes.items())
    return sharding.make_mesh(spec, devices[:preset.num_devices])


def sds(shape, dtype, sharding_: NamedSharding) -> jax.ShapeDtypeStruct:
    return jax.ShapeDtypeStruct(tuple(shape), dtype, sharding=sharding_)


def abstract_params(cfg: LlavaConfig, mesh, dtype=jnp.bfloat16):
    """(graphdef, parameter state of ShapeDtypeStructs carrying their NamedShardings): no memory is touched."""
    graphdef, state = nnx.split(abstract_model(cfg, dtype))
    flat = [(p, var.replace(sds(var.shape, var.dtype, sharding.named(
        mesh, sharding.param_logical_axes(p, len(var.shape)), var.shape)))) for p, var in nnx.to_flat_state(state)]
    return graphdef, nnx.from_flat_state(flat)


def shard_bytes(leaf: jax.ShapeDtypeStruct) -> int:
    """Bytes of one device's shard of `leaf` (every device holds one shard of this size)."""
    return math.prod(leaf.sharding.shard_shape(leaf.shape)) * jnp.dtype(leaf.dtype).itemsize


def full_bytes(leaf: jax.ShapeDtypeStruct) -> int:
    return math.prod(leaf.shape) * jnp.dtype(leaf.dtype).itemsize


def param_bytes_per_device(params) -> int:
    return sum(shard_bytes(leaf) for leaf in jax.tree.leaves(params))


def gather_bytes(params, prefix: str) -> int:
    """Bytes a device must add to hold the parameters under `prefix` whole (FSDP gathers a layer before its
    matmuls)."""
    return sum(full_bytes(var.get_value()) - shard_bytes(var.get_value()) for p, var in nnx.to_flat_state(params)
               if path_str(p).startswith(prefix))


def blink_config(size: common.Size) -> BlinkConfig:
    """Blink at the spec's defaults; layers 12-18 of 32 scaled to the decoder's depth, r = 3 on a tiny grid."""
    grid = size.image_size // size.patch
    return BlinkConfig(layers=default_layers(size.text_layers), region_size=6 if grid % 6 == 0 and grid > 6 else 3)


# ------------------------------------------------------------------------------------------------ programs


@functools.partial(jax.jit, static_argnames=("graphdef",), donate_argnames=("cache",))
def decode_step(graphdef, params, tokens, cache):
    """One greedy step of generation: tokens [B] -> (logits [B, V] float32, the cache with the tokens' keys)."""
    return forward.decode_step(nnx.merge(graphdef, params), tokens, cache)


def programs(size: common.Size, mesh, *, batch: int, length: int, new_tokens: int, train_batch: int) -> dict:
    """Program name -> (jitted function, abstract args, static kwargs), every array abstract and sharded."""
    cfg = LlavaConfig.from_hf_config(common.hf_config(size))
    graphdef, params = abstract_params(cfg, mesh)
    sharding.check_batch(batch, mesh)
    rep = sharding.replicated(mesh)
    tokens = sharding.batch_sharding(mesh, sharding.TOKEN_AXES)
    rows = sharding.batch_sharding(mesh, ("batch",))
    image = sharding.batch_sharding(mesh, sharding.IMAGE_AXES)
    s = cfg.vision.image_size
    prompt = (sds((batch, length), jnp.int32, tokens), sds((batch, 3, s, s), jnp.float32, image),
              sds((batch, length), jnp.int32, tokens))

    blink = blink_config(size)
    b = runner.prepare(blink, None, None, num_layers=cfg.text.num_hidden_layers, grid=cfg.vision.grid,
                       dim=cfg.text.hidden_size)
    bank_state, thresholds, key = jax.tree.map(lambda x: sds(jnp.shape(x), jnp.asarray(x).dtype, rep),
                                               (b.bank_state, b.thresholds, b.key))

    text = cfg.text
    cache_len = length + new_tokens
    head_dim = text.hidden_size // text.num_attention_heads
    kv = sharding.batch_sharding(mesh, ("batch", None, "kv_heads", "head_dim"))
    kv_shape = (batch, cache_len, text.num_key_value_heads, head_dim)
    layers = range(text.num_hidden_layers)
    cache = KVCache(k=tuple(sds(kv_shape, jnp.bfloat16, kv) for _ in layers),
                    v=tuple(sds(kv_shape, jnp.bfloat16, kv) for _ in layers),
                    valid=tuple(sds(kv_shape[:2], jnp.bool_, tokens) for _ in layers),
                    index=sds((), jnp.int32, rep), next_position=sds((batch,), jnp.int32, rows))

    sharding.check_batch(train_batch, mesh)
    student = sharding.batch_sharding(mesh, sharding.STUDENT_AXES)
    # train.tokensr's defaults (conv TokenSR of C = 512, its optimiser); the values do not change the program
    trained = dataclasses.replace(blink, tokensr_kind="conv", tokensr_channels=512)
    program = train_step.train_program(trained, text.hidden_size, 0, OptimConfig(lr=1e-4, warmup_steps=200,
                                       total_steps=5000), 1.0, 0.0, student)
    r, o, lp = blink.region_size, blink.sr_side, len(blink.layers)
    hs_lr = sds((lp, train_batch, r, r, text.hidden_size), jnp.float32, student)
    target = sds((lp, train_batch, o, o, text.hidden_size), jnp.float32, student)
    return {
        "vanilla prefill": (runtime._prefill, (graphdef, params, None, None, *prompt, None, None),
                            dict(static=None, scan=False)),
        "Blink prefill": (runtime._prefill, (graphdef, params, b.bank_def, bank_state, *prompt, thresholds, key),
                          dict(static=b.static, scan=False)),
        "decode step": (decode_step, (graphdef, params, sds((batch,), jnp.int32, rows), cache), {}),
        "TokenSR train step": (program.step, (program.abstract_state, hs_lr, target), {}),
    }


def export(fn, args, kwargs, platform: str) -> jax.export.Exported:
    return jax.export.export(fn, platforms=[platform])(*args, **kwargs)


# -------------------------------------------------------------------------------------------------- memory


@dataclasses.dataclass(frozen=True)
class Memory:
    """Bytes per device at one eval batch."""
    params: int
    kv_cache: int
    activations: int

    @property
    def total(self) -> int:
        return self.params + self.kv_cache + self.activations


def per_device_batch(batch: int, mesh) -> int:
    """Examples one device computes: the batch split over the mesh's batch axes, or whole (replicated) when they
    do not divide it, as `blink_jax.sharding` does with any dimension."""
    d = sharding.batch_divisor(mesh)
    return batch // d if batch % d == 0 else batch


def eval_memory(size: common.Size, mesh, params, batch: int, *, length: int, new_tokens: int) -> Memory:
    """Bytes per device of Blink's generation (prefill of `length` tokens, `new_tokens` decode steps) at `batch`.

    - parameters: exact, the sum over parameters of their shard's bytes (bfloat16).
    - KV cache: every decoder layer's keys and values, bfloat16, for the prompt, Blink's (s r)^2 SR slots and the
      new tokens, of the examples this device computes (the cache's kv heads split over `tensor` if it divides).
    - activations: the largest working set of one stage, with the FSDP gather of that stage's weights: a decoder
      layer's attention (residual, normed input, q and output [S, D], k and v, float32 logits and probabilities
      and their bfloat16 cast [N, S, S], S = prompt + SR slots: one query block, as on TPU/GPU), its MLP
      (residual, input, gate, up and their product [S, F]), a CLIP layer's attention and MLP the same way, and
      the LM head at the last position. The cache is live beside it (it fills during the prefill). Counted as
      materialised: XLA fuses some (e.g. the bfloat16 probabilities), so this is an upper estimate of the
      activations; it leaves out XLA's scratch, which `USABLE` stands for.
    """
    blink = blink_config(size)
    b = per_device_batch(batch, mesh)
    tensor = mesh.shape["tensor"]
    bf16, f32 = 2, 4
    d, f, n = size.text_width, size.text_ffn, size.text_heads
    kv_heads = size.text_kv_heads // tensor if size.text_kv_heads % tensor == 0 else size.text_kv_heads
    kv_width = d // n * size.text_kv_heads
    slots = length + blink.num_sr_tokens
    kv_cache = size.text_layers * 2 * b * (slots + new_tokens) * kv_heads * (d // n) * bf16

    def attention(tokens, width, heads, kv):
        return bf16 * tokens * (4 * width + 2 * kv) + (f32 + f32 + bf16) * heads * tokens * tokens

    def mlp(tokens, width, hidden):
        return bf16 * tokens * (2 * width + 3 * hidden)

    vt, dv = (size.image_size // size.patch) ** 2 + 1, size.vision_width
    decoder_gather = gather_bytes(params, "language_model.layers.0.")
    vision_gather = gather_bytes(params, "vision_tower.encoder.layers.0.")
    head_gather = gather_bytes(params, "language_model.lm_head")
    activations = max(b * attention(slots, d, n, kv_width) + decoder_gather,
                      b * mlp(slots, d, f) + decoder_gather,
                      b * attention(vt, dv, size.vision_heads, dv) + vision_gather,
                      b * mlp(vt, dv, 4 * dv) + vision_gather,
                      b * (bf16 * d + f32 * size.vocab) + head_gather)
    return Memory(param_bytes_per_device(params), kv_cache, activations)


def decode_argument_bytes(args) -> int:
    """One device's bytes of what the decode step reads: the language model's parameters (the vision tower and
    projector are unused there), the tokens and the whole KV cache, from the shardings."""
    _, params, tokens, cache = args
    text = sum(shard_bytes(var.get_value()) for p, var in nnx.to_flat_state(params)
               if path_str(p).startswith("language_model."))
    return text + shard_bytes(tokens) + sum(shard_bytes(leaf) for leaf in jax.tree.leaves(cache))


def xla_argument_bytes(fn, args, kwargs) -> int:
    """XLA's count of one device's argument bytes of the program compiled for this host's CPU devices (the
    same shardings; unused arguments are dropped). Its temporaries are the CPU's (e.g. bfloat16 weights
    widened to float32 for CPU matmuls), so only the arguments are comparable with a TPU or GPU."""
    return fn.trace(*args, **kwargs).lower().compile().memory_analysis().argument_size_in_bytes


def max_batch(size, mesh, params, chip_bytes: int, *, length: int, new_tokens: int, limit: int = 4096) -> int:
    """The largest batch the batch axes divide whose estimate fits `USABLE` of the chip (0: none)."""
    d = sharding.batch_divisor(mesh)
    best = 0
    for batch in range(d, limit + 1, d):
        if eval_memory(size, mesh, params, batch, length=length, new_tokens=new_tokens).total > USABLE * chip_bytes:
            break
        best = batch
    return best


def gib(x: int) -> str:
    return f"{x / GiB:.2f}"


# ------------------------------------------------------------------------------------------------------ run


def run(sizes: dict[str, common.Size], presets, platforms, *, batches, export_batch: int, train_batch: int,
        length: int, new_tokens: int, log=print) -> tuple[str, str, str]:
    """Exports every program for every (preset, model, platform); -> (exports table, XLA's check of the
    per-device bytes, memory table)."""
    devices = jax.devices("cpu")
    export_rows = ["| preset | model | program | platform | StableHLO (MiB) | export (s) |", "|---|---|---|---|---|---|"]
    check_rows = ["| preset | model | decode step arguments per device (GiB): ours | XLA, compiled for CPU |",
                  "|---|---|---|---|"]
    memory_rows = ["| preset (chips x memory) | model | params/device (GiB) | eval batch | per device | "
                   "KV cache (GiB) | activations (GiB) | total (GiB) | of chip | held | largest batch held |",
                   "|---|---|---|---|---|---|---|---|---|---|---|"]
    for preset in presets:
        mesh = preset_mesh(preset, devices)
        chip, chip_bytes = CHIP.get(preset, (preset, None))
        for name, size in sizes.items():
            progs = programs(size, mesh, batch=export_batch, length=length, new_tokens=new_tokens,
                             train_batch=train_batch)
            for program, (fn, args, kwargs) in progs.items():
                for platform in platforms:
                    start = time.perf_counter()
                    exported = export(fn, args, kwargs, platform)
                    seconds = time.perf_counter() - start
                    export_rows.append(f"| {preset} | {name} | {program} | {platform} | "
                                       f"{len(exported.mlir_module_serialized) / 2 ** 20:.2f} | {seconds:.1f} |")
                    log(export_rows[-1])
            params = progs["vanilla prefill"][1][1]
            fn, args, kwargs = progs["decode step"]
            ours, xla = decode_argument_bytes(args), xla_argument_bytes(fn, args, kwargs)
            check_rows.append(f"| {preset} | {name} | {ours / GiB:.4f} | {xla / GiB:.4f} |"
                              + ("" if ours == xla else " **differ**"))
            log(check_rows[-1])
            largest = ("-" if chip_bytes is None else
                       max_batch(size, mesh, params, chip_bytes, length=length, new_tokens=new_tokens))
            for batch in batches:
                m = eval_memory(size, mesh, params, batch, length=length, new_tokens=new_tokens)
                share = "-" if chip_bytes is None else f"{m.total / chip_bytes:.0%}"
                held = "-" if chip_bytes is None else ("yes" if m.total <= USABLE * chip_bytes else "**no**")
                chips = f"{mesh.devices.size} x {chip}" + ("" if chip_bytes is None else f" {chip_bytes // GiB} GiB")
                memory_rows.append(f"| {preset} ({chips}) | {name} | {gib(m.params)} | {batch} | "
                                   f"{per_device_batch(batch, mesh)} | {gib(m.kv_cache)} | {gib(m.activations)} | "
                                   f"{gib(m.total)} | {share} | {held} | {largest} |")
                log(memory_rows[-1])
    return "\n".join(export_rows), "\n".join(check_rows), "\n".join(memory_rows)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--sizes", default="7b,13b", help=f"comma-separated model shapes of {sorted(common.ALL_SIZES)}")
    p.add_argument("--presets", default="tpu_v4_8,tpu_v5e_8,gpu_8",
                   help=f"comma-separated mesh presets of blink_jax.sharding ({', '.join(sharding.PRESETS)})")
    p.add_argument("--platforms", default="tpu,cuda", help=f"comma-separated jax.export platforms of {PLATFORMS}")
    p.add_argument("--batch", default="1,8,32", help="eval batch sizes of the memory table")
    p.add_argument("--export-batch", type=int, default=8, help="batch of the exported eval programs")
    p.add_argument("--train-batch", type=int, default=16, help="batch of the exported TokenSR train step")
    p.add_argument("--length", type=int, default=650, help="prompt length in tokens (576 of them image tokens)")
    p.add_argument("--new-tokens", type=int, default=16, help="decode room in the cache (eval.run's POPE: 16)")
    a = p.parse_args(argv)
    names, presets, platforms = ([s.strip() for s in text.split(",")] for text in (a.sizes, a.presets, a.platforms))
    for bad in [n for n in names if n not in common.ALL_SIZES]:
        p.error(f"--sizes: {bad!r} is not one of {sorted(common.ALL_SIZES)}")
    for bad in [n for n in presets if n not in sharding.PRESETS]:
        p.error(f"--presets: {bad!r} is not one of {', '.join(sharding.PRESETS)}")
    for bad in [n for n in platforms if n not in PLATFORMS]:
        p.error(f"--platforms: {bad!r} is not one of {PLATFORMS}")
    simulate_host_devices(max(sharding.PRESETS[n].num_devices for n in presets))
    start = time.perf_counter()
    exports, check, memory = run({n: common.ALL_SIZES[n] for n in names}, presets, platforms,
                                 batches=common.batch_sizes(a.batch), export_batch=a.export_batch,
                                 train_batch=a.train_batch, length=a.length, new_tokens=a.new_tokens,
                                 log=lambda line: print(line, file=sys.stderr, flush=True))  # progress
    print(f"\nmachine: {common.machine()}\nexported at batch {a.export_batch} (train step {a.train_batch}), "
          f"prompt {a.length} tokens, {a.new_tokens} new tokens, bfloat16 parameters\n\n{exports}\n\n"
          f"Per-device bytes from the shardings against XLA's, at the export batch\n\n{check}\n\n"
          f"Memory per device, Blink's generation at eval batch (held: under {USABLE:.0%} of the chip)\n\n"
          f"{memory}\n\n({time.perf_counter() - start:.0f} s in all)")


if __name__ == "__main__":
    main()
