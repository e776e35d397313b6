"""The bundled demo's shared code: the shapes data it is trained and evaluated on, and the POPE file format.

It sits below `train` and `eval` (both use it; it imports nothing of theirs), next to the demo's data
(`model/`, `tokensr/`, `data/`, described in `MODEL_CARD.md`).

Modules:
  shapes  scenes of small coloured shapes, zoomed crops, training questions, the POPE-format eval set writer
  pope    POPE's file format and LLaVA's `eval_pope.py` scoring (yes/no parse, confusion metrics)
"""
