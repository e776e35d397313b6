"""The import structure: the library stands alone, the layers on top never import each other, no cycles.

Every `import` statement of every module is read with `ast` (function-level imports too, so a lazy import
cannot hide an edge). Layers, lowest first:

    blink_jax               the library: model, Blink, checkpoint reading/writing, sharding, loading
    demo                    the demo's shapes data and the POPE file format (shared by train and eval)
    checkpoints_conversion  command lines over blink_jax.weights
    train, eval             TokenSR training and evaluation
    bench                   measures the library, and the commands through their command lines (subprocesses)

`MAY_IMPORT` is the whole policy; the checker is tested on small synthetic trees first, so it can fail.
"""

from __future__ import annotations

import ast
import textwrap
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
PACKAGES = ("blink_jax", "demo", "checkpoints_conversion", "train", "eval", "bench")
# Top-level package -> the other top-level packages it may import.
MAY_IMPORT = {
    "blink_jax": set(),
    "demo": {"blink_jax"},
    "checkpoints_conversion": {"blink_jax"},
    "train": {"blink_jax", "demo"},
    "eval": {"blink_jax", "demo"},
    "bench": {"blink_jax", "demo"},
}


def modules(root: Path) -> dict[str, Path]:
    """Dotted module name -> file, for every .py file of each package in `PACKAGES` that is a package."""
    found = {}
    for pkg in PACKAGES:
        if not (root / pkg / "__init__.py").is_file():
            continue
        for file in sorted((root / pkg).rglob("*.py")):
            parts = file.relative_to(root).with_suffix("").parts
            found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = file
    return found


def _resolve(name: str, known: dict[str, Path]) -> str | None:
    """The module an imported name lives in: the longest known module that prefixes it (None: not ours)."""
    while name and name not in known:
        name = name.rpartition(".")[0]
    return name or None


def import_graph(root: Path) -> dict[str, set[str]]:
    """Module -> the modules of ours it imports (anywhere in its body)."""
    known = modules(root)
    graph: dict[str, set[str]] = {m: set() for m in known}
    for module, file in known.items():
        package = module if file.name == "__init__.py" else module.rpartition(".")[0]
        for node in ast.walk(ast.parse(file.read_text(), str(file))):
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom):
                base = node.module or ""
                if node.level:
                    anchor = package.split(".")[: len(package.split(".")) - (node.level - 1)]
                    base = ".".join(anchor + ([base] if base else []))
                # `from pkg import sub` imports the submodule `pkg.sub` when there is one, else names of `pkg`
                names = [f"{base}.{alias.name}" if f"{base}.{alias.name}" in known else base for alias in node.names]
            else:
                continue
            for name in names:
                target = _resolve(name, known)
                if target is not None and target != module:
                    graph[module].add(target)
    return graph


def cycles(graph: dict[str, set[str]]) -> list[list[str]]:
    """The strongly connected components with more than one module (Tarjan), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    stack: list[str] = []
    on_stack: set[str] = set()
    found: list[list[str]] = []

    def visit(v: str) -> None:
        index[v] = low[v] = len(index)
        stack.append(v)
        on_stack.add(v)
        for w in sorted(graph[v]):
            if w not in index:
                visit(w)
                low[v] = min(low[v], low[w])
            elif w in on_stack:
                low[v] = min(low[v], index[w])
        if low[v] == index[v]:
            component = []
            while True:
                w = stack.pop()
                on_stack.discard(w)
                component.append(w)
                if w == v:
                    break
            if len(component) > 1:
                found.append(sorted(component))

    for v in sorted(graph):
        if v not in index:
            visit(v)
    return sorted(found)


def violations(graph: dict[str, set[str]]) -> list[str]:
    """Every import that breaks the layering, and every cycle, as readable lines."""
    out = []
    for module in sorted(graph):
        top = module.split(".")[0]
        for target in sorted(graph[module]):
            other = target.split(".")[0]
            if other != top and other not in MAY_IMPORT[top]:
                may = ", ".join(sorted(MAY_IMPORT[top])) or "nothing outside itself"
                out.append(f"{module} imports {target}: {top} may import {may}")
    out += ["import cycle among " + ", ".join(c) for c in cycles(graph)]
    return out


# -------------------------------------------------------------------------------------- the checker itself


def _tree(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        (root / name).parent.mkdir(parents=True, exist_ok=True)
        (root / name).write_text(textwrap.dedent(text))
    return root


def test_checker_finds_upward_imports_sideways_imports_and_cycles(tmp_path):
    root = _tree(tmp_path, {
        "blink_jax/__init__.py": "from blink_jax.model import Model\n",
        "blink_jax/model.py": "import numpy as np\nclass Model: ...\n",
        "blink_jax/loading.py": "def load():\n    from checkpoints_conversion import reader  # lazy: still an edge\n",
        "blink_jax/a.py": "from . import b\n",
        "blink_jax/b.py": "from .c import f\n",
        "blink_jax/c.py": "from blink_jax import a\ndef f(): ...\n",
        "checkpoints_conversion/__init__.py": "",
        "checkpoints_conversion/reader.py": "import blink_jax.model\n",
        "train/__init__.py": "",
        "train/demo.py": "from eval.benchmarks.pope import parse\n",
        "eval/__init__.py": "",
        "eval/benchmarks/__init__.py": "",
        "eval/benchmarks/pope.py": "from ..harness import run\ndef parse(): ...\n",
        "eval/harness.py": "import demo.shapes\nfrom blink_jax import Model\n",
        "demo/__init__.py": "",
        "demo/shapes.py": "",
        "bench/__init__.py": "",
        "bench/x.py": "from train import demo\nimport eval.harness\n",
    })
    graph = import_graph(root)
    assert graph["eval.benchmarks.pope"] == {"eval.harness"}  # relative import two levels up
    assert graph["blink_jax.a"] == {"blink_jax.b"} and graph["blink_jax.b"] == {"blink_jax.c"}
    assert graph["eval.harness"] == {"demo.shapes", "blink_jax"}  # a name of the package: its __init__
    assert violations(graph) == [
        "bench.x imports eval.harness: bench may import blink_jax, demo",
        "bench.x imports train.demo: bench may import blink_jax, demo",
        "blink_jax.loading imports checkpoints_conversion.reader: blink_jax may import nothing outside itself",
        "train.demo imports eval.benchmarks.pope: train may import blink_jax, demo",
        "import cycle among blink_jax.a, blink_jax.b, blink_jax.c",
    ]


def test_checker_passes_a_clean_tree_and_skips_a_folder_that_is_no_package(tmp_path):
    root = _tree(tmp_path, {
        "blink_jax/__init__.py": "from blink_jax.loading import load\n",
        "blink_jax/loading.py": "from blink_jax import weights\ndef load(): ...\n",
        "blink_jax/weights.py": "import json\n",
        "train/__init__.py": "from blink_jax import load\nimport demo.shapes\n",
        "demo/shapes.py": "import train\n",  # demo/ without __init__.py: data, not a package
    })
    graph = import_graph(root)
    assert set(graph) == {"blink_jax", "blink_jax.loading", "blink_jax.weights", "train"}
    assert violations(graph) == []


# ------------------------------------------------------------------------------------------ this repository


def test_repository_layering():
    graph = import_graph(REPO)
    assert {"blink_jax.loading", "train.loop", "eval.run", "checkpoints_conversion.hf_to_orbax"} <= set(graph)
    problems = violations(graph)
    assert not problems, "import structure broken:\n  " + "\n  ".join(problems)


@pytest.mark.parametrize("package", sorted(MAY_IMPORT))
def test_policy_names_only_known_layers(package):
    assert MAY_IMPORT[package] <= set(PACKAGES) - {package}
