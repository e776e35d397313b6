"""Several processes, one program: `jax.distributed` set up once per process, and the few host-side steps that
must wait for every host (after maxtext's `max_utils`).

Every process of a run is started with the same command plus its own `--process-id`; `--coordinator HOST:PORT`
(process 0's address, a free port) and `--num-processes N` are the same everywhere. Without the flags, JAX's
own environment variables (JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID) and cluster detection
(TPU pods, SLURM, ...) decide, as `jax.distributed.initialize()` does. Work directories, data and outputs must
be on a file system that every host sees.
"""

from __future__ import annotations

import argparse

import jax
from jax.experimental import multihost_utils

_INITIALIZED = False


class DistributedError(ValueError):
    """Multi-process flags that cannot start a run, naming the flag and the fix."""


def add_arguments(parser: argparse.ArgumentParser | argparse._ArgumentGroup) -> None:
    """The multi-process flags, the same on every command that runs on several hosts."""
    parser.add_argument("--coordinator", metavar="HOST:PORT", default=None,
                        help="multi-process: address of process 0 (a free port), the same for every process; "
                             "without it JAX's environment variables / cluster detection decide")
    parser.add_argument("--num-processes", type=int, default=None, metavar="N",
                        help="multi-process: how many processes the run has (with --coordinator)")
    parser.add_argument("--process-id", type=int, default=None, metavar="I",
                        help="multi-process: this process's index, 0..N-1 (with --coordinator)")


def requested(args: argparse.Namespace) -> bool:
    """Whether the flags of `add_arguments` ask for a multi-process run."""
    return any(getattr(args, name, None) is not None for name in ("coordinator", "num_processes", "process_id"))


def initialize(coordinator: str | None = None, num_processes: int | None = None,
               process_id: int | None = None) -> None:
    """`jax.distributed.initialize` with the values given (None: JAX detects them), once per process; CPU
    collectives go through gloo, so a laptop with several processes rehearses a pod. Must run before anything
    touches a device."""
    global _INITIALIZED
    if _INITIALIZED:
        return
    if coordinator is not None and ":" not in coordinator:
        raise DistributedError(f"--coordinator {coordinator!r} needs a port: HOST:PORT, e.g. localhost:12355")
    if num_processes is not None and num_processes < 1:
        raise DistributedError(f"--num-processes {num_processes} must be at least 1")
    if process_id is not None and num_processes is not None and not 0 <= process_id < num_processes:
        raise DistributedError(f"--process-id {process_id} is outside 0..{num_processes - 1} (--num-processes "
                               f"{num_processes})")
    jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU devices of several processes talk
    jax.distributed.initialize(coordinator_address=coordinator, num_processes=num_processes, process_id=process_id)
    _INITIALIZED = True


def initialize_from_args(args: argparse.Namespace) -> None:
    initialize(args.coordinator, args.num_processes, args.process_id)


def is_main() -> bool:
    """Process 0 writes the files every host shares (results, exports)."""
    return jax.process_index() == 0


def barrier(name: str) -> None:
    """Waits until every process has reached the barrier `name` (nothing to wait for with one process)."""
    if jax.process_count() > 1:
        multihost_utils.sync_global_devices(name)
