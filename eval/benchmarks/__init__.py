"""The benchmarks of the paper's table, by name: `get("pope")`."""

from __future__ import annotations

from eval.benchmarks.base import Benchmark, DataError, load_docs
from eval.benchmarks.gqa import Gqa
from eval.benchmarks.mmbench import MmBench, MmBenchCn
from eval.benchmarks.mme import Mme
from eval.benchmarks.mmvet import MmVet
from eval.benchmarks.pope import Pope
from eval.benchmarks.scienceqa import ScienceQa

REGISTRY: dict[str, Benchmark] = {b.name: b for b in (Pope(), Mme(), Gqa(), MmBench(), MmBenchCn(), ScienceQa(), MmVet())}
NAMES = tuple(REGISTRY)


def get(name: str) -> Benchmark:
    key = name.lower().replace("-", "_")
    if key not in REGISTRY:
        raise KeyError(f"benchmark {name!r} is unknown; use one of {', '.join(NAMES)}")
    return REGISTRY[key]


__all__ = ["Benchmark", "DataError", "NAMES", "REGISTRY", "get", "load_docs"]
