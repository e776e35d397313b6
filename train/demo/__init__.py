"""The demo model: a small LLaVA-1.5 trained from scratch on procedurally drawn shapes (GitHub issue 7).

Modules, one concern each:
  tokenizer  the word-level HF tokenizer over the task's vocabulary
  backbone   model config, from-scratch init, packed training batches, loss, train loop, HF export, evaluation
  zoom       the premise: accuracy from the full scene vs zoomed crops, per geometry, with paired intervals
  oracle     Blink with the teacher's own states as SR tokens (what a perfect TokenSR would do)
  breakdown  an eval.run result by object size, expansion per layer and region hits

Its data, shared with eval, is the top-level `demo` package (`demo.shapes`). The command is
`python -m train.demo_backbone` (see `demo/MODEL_CARD.md` for the shipped run).
"""
