"""TokenSR training's pure mechanics (BLINK.md §5), for `train/` (the run) and `bench/` (its exported program):

  loss   KL (+ MSE) distillation of TokenSR's output against the zoomed crop's hidden states
  optim  AdamW with linear warm-up, cosine decay and global-norm clipping, for the TokenSR parameters only
  step   the train state (shapes, shardings from the rules, born sharded) and the donated, jitted train step
"""
