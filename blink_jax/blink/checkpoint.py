"""The trained-TokenSR directory that `train.tokensr` exports and `--tokensr DIR` reads.

Layout: `tokensr.json` (the BlinkConfig the modules were trained for, the model width, provenance) and
`params/` (an orbax checkpoint of the `TokenSRBank` state). Written into a temporary sibling and renamed
into place, so a killed save never leaves a directory that looks complete.
"""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
from pathlib import Path

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from flax import nnx

from blink_jax.blink.config import BlinkConfig
from blink_jax.blink.tokensr import TokenSRBank

FORMAT = "blink-jax-tokensr/1"


def save_tokensr(out_dir: str | os.PathLike, bank: TokenSRBank, blink: BlinkConfig, *, dim: int,
                 extra: dict | None = None, overwrite: bool = True) -> Path:
    """Writes `bank` (trained for `blink`'s layers) to `out_dir` atomically."""
    out_dir = Path(out_dir).absolute()
    if blink.tokensr_kind != "conv":
        raise ValueError(f"only conv TokenSR has parameters to save; BlinkConfig.tokensr_kind={blink.tokensr_kind!r}")
    if out_dir.exists() and not overwrite:
        raise FileExistsError(f"{out_dir} exists; pass overwrite=True or choose another directory")
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    state = jax.tree.map(lambda x: jnp.asarray(x, jnp.float32), nnx.to_pure_dict(nnx.state(bank, nnx.Param)))
    with ocp.StandardCheckpointer() as ckptr:
        ckptr.save(tmp / "params", state)
        ckptr.wait_until_finished()
    meta = {"format": FORMAT, "dim": dim, "blink": dataclasses.asdict(blink), **(extra or {})}
    (tmp / "tokensr.json").write_text(json.dumps(meta, indent=2))
    if out_dir.exists():
        shutil.rmtree(out_dir)
    os.replace(tmp, out_dir)
    return out_dir


def load_tokensr(path: str | os.PathLike) -> tuple[TokenSRBank, BlinkConfig]:
    """-> (bank, the BlinkConfig it was trained with). Use the config's static fields with your own thresholds."""
    path = Path(path).absolute()
    meta_file = path / "tokensr.json"
    if not meta_file.is_file():
        raise FileNotFoundError(f"'{path}' is not a TokenSR checkpoint (no tokensr.json): give the directory that "
                                f"`python -m train.tokensr` exported (its `tokensr/` folder)")
    meta = json.loads(meta_file.read_text())
    if meta.get("format") != FORMAT:
        raise ValueError(f"{meta_file}: format {meta.get('format')!r}, expected {FORMAT!r}")
    fields = dict(meta["blink"])
    fields["layers"] = tuple(fields["layers"])
    blink = BlinkConfig(**fields)
    bank = nnx.eval_shape(lambda: TokenSRBank(blink, meta["dim"], rngs=nnx.Rngs(0)))
    target = nnx.to_pure_dict(nnx.state(bank, nnx.Param))
    # Onto this process's first device, whatever topology saved it (a multi-process eval restores it on every host).
    device = jax.sharding.SingleDeviceSharding(jax.local_devices()[0])
    abstract = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, jnp.float32, sharding=device), target)
    with ocp.StandardCheckpointer() as ckptr:
        restored = ckptr.restore(path / "params", abstract)
    state = nnx.state(bank, nnx.Param)
    nnx.replace_by_pure_dict(state, restored)
    nnx.update(bank, state)
    return bank, blink


def fingerprint(bank: TokenSRBank) -> str:
    """sha256 of a TokenSR bank's parameter values (paths, shapes, dtypes and bytes), hex: tells two trained
    checkpoints apart wherever they are stored (e.g. for an eval's resume check)."""
    import hashlib

    import numpy as np

    digest = hashlib.sha256()
    for path, value in sorted(nnx.to_flat_state(nnx.state(bank, nnx.Param)), key=lambda kv: str(kv[0])):
        array = np.ascontiguousarray(np.asarray(value[...]))
        digest.update(f"{path}|{array.shape}|{array.dtype}".encode())
        digest.update(array.tobytes())
    return digest.hexdigest()
