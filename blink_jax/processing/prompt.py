"""The LLaVA-1.5 eval prompt (conversation template `vicuna_v1`, one image, one question)."""

from __future__ import annotations

IMAGE_PLACEHOLDER = "<image>"
VICUNA_V1_SYSTEM = (
    "A chat between a curious user and an artificial intelligence assistant. "
    "The assistant gives helpful, detailed, and polite answers to the user's questions."
)
SHORT_ANSWER_SUFFIX = "Answer the question using a single word or phrase."


def build_prompt(question: str, *, suffix: str | None = SHORT_ANSWER_SUFFIX, images: int = 1) -> str:
    """`vicuna_v1` prompt with the image before the question, as in LLaVA's `model_vqa_loader.py`.

    `suffix` goes on its own line after the question (None leaves it out); the prompt ends with
    "ASSISTANT:", so the next token predicted is the first answer token. `images` > 1 puts that many `<image>`s,
    a line each, before the question (the crop baseline's image and crop).
    """
    user = f"{IMAGE_PLACEHOLDER}\n" * images + question + (f"\n{suffix}" if suffix is not None else "")
    return f"{VICUNA_V1_SYSTEM} USER: {user} ASSISTANT:"
