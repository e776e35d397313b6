"""The order in which `--dist loadfile` hands test files to the workers: the slowest files first.

xdist's default order is by number of tests per file, which puts files of a few slow tests (several subprocesses,
minutes each) near the end, where one worker can be left running one of them while the other has nothing to do.
Handing the longest files out first (then the rest in xdist's order) lets the short files fill the gaps at the end.
"""

from __future__ import annotations

from collections import Counter

# Longest first (seconds on the 2-core CI machine, two workers, as last measured).
SLOWEST_FILES = ("test_bench_smoke.py",  # ~200: nine bench scripts, some with subprocesses
                 "test_train_tokensr.py",  # ~170: 8-device and 2-process training subprocesses
                 "test_eval_mesh.py",  # ~150: 8-device and 2-process eval subprocesses
                 "test_demo_backbone.py",  # ~150
                 "test_load_sharded.py",  # ~90: the 8-device loads subprocess
                 "test_blink_inference.py",  # ~85
                 "test_crop.py",
                 "test_attention_blocks.py",
                 "test_bench_lower.py")  # the 8-device export subprocess


def pytest_configure(config):
    if getattr(config.option, "dist", "no") in ("loadfile", "loadscope"):
        config.option.loadscopereorder = False  # as --no-loadscope-reorder: the order below is the one used


def pytest_collection_modifyitems(items):
    tests = Counter(item.path.name for item in items)
    rank = {name: i for i, name in enumerate(SLOWEST_FILES)}
    # sorted() is stable: a file's tests keep their order
    items[:] = sorted(items, key=lambda item: (rank.get(item.path.name, len(rank)), -tests[item.path.name]))
