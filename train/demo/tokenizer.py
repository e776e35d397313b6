"""A word-level Hugging Face tokenizer over the demo task's whole vocabulary.

Its words are the LLaVA-1.5 eval prompt (`build_prompt`), the POPE question template, the colours and shapes
and the answers, pre-tokenised with the same `Whitespace` rule the tokenizer uses, so no prompt the demo
asks contains `<unk>`. Ids: 0 `<unk>`, 1 `<s>` (BOS, prepended), 2 `</s>` (EOS), 3 `<pad>`, 4 `<image>`
(the image placeholder, LLaVA's `image_token_index`), then the words in first-seen order.
"""

from __future__ import annotations

import os

from blink_jax.processing import SHORT_ANSWER_SUFFIX, VICUNA_V1_SYSTEM
from demo.shapes import COLOURS, SHAPES, question_text

SPECIALS = ("<unk>", "<s>", "</s>", "<pad>", "<image>")
UNK_ID, BOS_ID, EOS_ID, PAD_ID, IMAGE_ID = range(len(SPECIALS))
ANSWERS = ("Yes", "No")


def _pre_tokenize(text: str) -> list[str]:
    from tokenizers import pre_tokenizers

    return [piece for piece, _ in pre_tokenizers.Whitespace().pre_tokenize_str(text)]


def vocabulary() -> dict[str, int]:
    """word -> id, specials first."""
    texts = [VICUNA_V1_SYSTEM, "USER: ASSISTANT:", SHORT_ANSWER_SUFFIX, " ".join(ANSWERS)]
    texts += [question_text(c, s) for c in COLOURS for s in SHAPES]
    words = [w for text in texts for w in _pre_tokenize(text)]
    return {tok: i for i, tok in enumerate(dict.fromkeys(SPECIALS + tuple(words)))}


def build_tokenizer(out_dir: str | os.PathLike | None = None):
    """The demo's `PreTrainedTokenizerFast` (BOS prepended, left padding); saved to `out_dir` when given."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors
    from transformers import PreTrainedTokenizerFast

    vocab = vocabulary()
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=True)  # joins words with spaces, tidies " ." and " '"
    # The BOS is added by the tokenizer itself, so AutoTokenizer.from_pretrained(dir) behaves the same.
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", BOS_ID)])
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>", pad_token="<pad>",
        additional_special_tokens=["<image>"], padding_side="left", model_max_length=512,
    )
    if out_dir is not None:
        fast.save_pretrained(str(out_dir))
    return fast
