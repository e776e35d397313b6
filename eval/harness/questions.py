"""Questions the model cannot take, named before they are batched: each becomes an `error` line of the samples
file (counted wrong, listed beside the metrics, retried with --retry-errors), never a silent answer."""

from __future__ import annotations

from collections.abc import Mapping, Sequence


def question_error(doc: Mapping, ids: Sequence[int], *, max_positions: int, max_new_tokens: int) -> str | None:
    """Why the question of `doc`, tokenised to `ids` [T] (image tokens included), cannot be asked, or None.

    The prompt and every token generated after it need a position below `max_positions` (the model's
    `max_position_embeddings`): past it the model would answer from positions it was never trained on."""
    if not str(doc.get("question") or "").strip():
        return "the question is empty: correct that row of the benchmark's data"
    needed = len(ids) + max_new_tokens
    if needed > max_positions:
        return (f"the prompt is {len(ids)} tokens (the image's included) and the answer up to {max_new_tokens} more: "
                f"{needed} positions, past the model's context of {max_positions} (max_position_embeddings); shorten "
                f"the question, or lower --max-new-tokens if the prompt alone fits")
    return None
