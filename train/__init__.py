"""TokenSR training (BLINK.md §5): `python -m train.tokensr --model DIR --data-dir DIR --workdir DIR --mesh cpu`.

Modules, one concern each:
  config         `TrainConfig`, every knob of a run
  data/          the LLaVA-1.5 mix as a tfds builder, and the grain input pipeline
  backbone       the frozen LLaVA, loaded straight into its shardings; its fingerprint
  student        SGS region choice and TokenSR inputs h_L[region](image), one jitted probe
  teacher        crop targets h_L[visual](crop), area-pooled, with an on-disk cache
  loss, optim    KL (+ MSE) distillation loss; AdamW with warm-up + cosine and clipping
  step           the train state (shapes, shardings, born sharded) and the donated, jitted train step
  checkpointing  orbax CheckpointManager: train state + grain iterator, and the TokenSR export
  metrics        console progress bar, metrics.jsonl (TensorBoard when available)
  inputs         what a step consumes: the grain loader, and the student inputs and teacher targets on the mesh
  stopping       early stops that leave a resumable checkpoint: a non-finite loss, Ctrl-C
  workdir        config.json, the resume check of a work directory, the export's provenance
  loop           the `Trainer` that ties them together
"""
