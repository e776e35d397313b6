"""The demo model: a small LLaVA-1.5 trained from scratch on procedurally drawn shapes (GitHub issue 7).

Modules, one concern each:
  tokenizer  the word-level HF tokenizer over the task's vocabulary
  backbone   model config, from-scratch init, packed training batches, loss, train loop, HF export, evaluation

Its data, shared with eval, is the top-level `demo` package (`demo.shapes`). The command is
`python -m train.demo_backbone` (see `demo/MODEL_CARD.md` for the shipped run).
"""
