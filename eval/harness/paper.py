"""The paper's numbers (BLINK.md §7, LLaVA-1.5-7B): the targets printed beside a run's own."""

from __future__ import annotations

KINDS = ("vanilla", "interp", "blink", "crop")
KIND_LABELS = {"vanilla": "Vanilla", "interp": "Blink-interp", "blink": "Blink", "crop": "Crop (two-pass)"}

PAPER: dict[str, dict[str, float]] = {
    "MME Perception": {"vanilla": 1505.72, "interp": 1514.08, "blink": 1519.74},
    "MME Cognition": {"vanilla": 357.86, "interp": 353.21, "blink": 361.79},
    "GQA": {"vanilla": 61.93, "interp": 61.93, "blink": 61.98},
    "MMBench": {"vanilla": 64.60, "interp": 64.69, "blink": 64.69},
    "MMBench-CN": {"vanilla": 58.08, "interp": 58.51, "blink": 58.59},
    "POPE": {"vanilla": 85.17, "interp": 85.17, "blink": 85.23},
    "ScienceQA": {"vanilla": 69.46, "interp": 69.51, "blink": 69.66},
    "MM-Vet": {"vanilla": 32.20, "interp": 31.70, "blink": 33.40},
}
# MME total (perception + cognition) of Blink under each §6 ablation.
ABLATION_MME_TOTAL = {"full": 1881.53, "random": 1879.38, "fixed": 1840.46, "no-drop": 1884.03, "high-tau": 1865.54}


def paper_value(row: str, kind: str, ablation: str | None = None) -> float | None:
    """The paper's number for a table row and a mode kind ("vanilla" | "interp" | "blink" | "crop"), None if it has
    none.

    Under an ablation the paper reports only Blink's MME total; vanilla is unaffected by ablations.
    """
    if ablation not in (None, "full") and kind != "vanilla":
        return ABLATION_MME_TOTAL.get(ablation) if (row == "MME total" and kind == "blink") else None
    if kind not in PAPER["POPE"]:  # the crop baseline (BLINK.md §9) is not in the paper
        return None
    if row == "MME total":
        return round(PAPER["MME Perception"][kind] + PAPER["MME Cognition"][kind], 2)
    return PAPER.get(row, {}).get(kind)
