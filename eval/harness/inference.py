"""The model call of one batch: prompts and pixels padded to the batch's fixed shape -> greedy answers as text, and
Blink's trace.

Every batch is padded to `batch_size` rows and its bucket's length, so the jitted generate compiles one program per
(mode, bucket); `programs` records those shapes for results.json.
"""

from __future__ import annotations

import zlib
from collections.abc import Sequence

import jax
import jax.numpy as jnp
import numpy as np

from eval.harness.batching import pad_batch
from eval.harness.modes import ModeSpec


class Answerer:
    def __init__(self, model, tokenizer, *, batch_size: int, max_new_tokens: int, seed: int):
        self.model, self.tokenizer = model, tokenizer
        self.batch_size, self.max_new_tokens, self.seed = batch_size, max_new_tokens, seed
        text = model.config.text
        self.pad_id = int(text.pad_token_id if text.pad_token_id is not None else (tokenizer.pad_token_id or 0))
        self.eos_id = text.eos_token_id
        self.programs: dict[str, set[tuple[int, int, int]]] = {}  # mode -> (B, T, new tokens) compiled

    def __call__(self, mode: ModeSpec, length: int, ids: Sequence[Sequence[int]], pixels: Sequence[np.ndarray],
                 question_ids: Sequence[str]):
        """n prompts (token ids, each <= length) and their pixels [3, H, W] -> (n answers, HostTrace or None)."""
        inputs = pad_batch(ids, pixels, length=length, batch_size=self.batch_size, pad_id=self.pad_id)
        self.programs.setdefault(mode.name, set()).add((self.batch_size, length, self.max_new_tokens))
        tokens, trace = self.model.generate(
            **inputs, max_new_tokens=self.max_new_tokens, blink=mode.blink, tokensr=mode.tokensr,
            rng=self.keys(question_ids) if mode.blink is not None else None, return_trace=True)
        return [self.decode(tokens[i]) for i in range(len(ids))], trace

    def keys(self, question_ids: Sequence[str]):
        """One PRNG key per batch row ([batch_size, 2]), from the seed and the row's question id alone, so the
        random-region ablation gives a question the same region whatever shares its batch (a resumed run
        batches differently). Padding rows get the key of question id ""."""
        ids = list(question_ids) + [""] * (self.batch_size - len(question_ids))
        data = jnp.asarray([zlib.crc32(q.encode()) & 0x7FFFFFFF for q in ids], jnp.uint32)
        return jax.vmap(jax.random.fold_in, in_axes=(None, 0))(jax.random.key(self.seed), data)

    def decode(self, tokens: np.ndarray) -> str:
        """Generated ids [new tokens] -> the answer: up to the first EOS, special tokens left out."""
        tokens = [int(t) for t in tokens]
        if self.eos_id is not None and self.eos_id in tokens:
            tokens = tokens[:tokens.index(self.eos_id)]
        return self.tokenizer.decode(tokens, skip_special_tokens=True).strip()
