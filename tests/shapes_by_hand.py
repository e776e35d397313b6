"""The demo's crop geometry written out by hand, for the tests: a 336 px photo shown to the model at 168 px as
a 12 x 12 grid of 14 px patches, not through blink_jax or demo.shapes."""

from __future__ import annotations


def region_box(cx: float, cy: float, r: int, context: float) -> tuple[int, int, int, int]:
    """The box, in the photo's pixels, of the r x r region of the 12 x 12 grid holding the photo point (cx, cy),
    grown by `context` about its centre and clamped to the model's 168 px input."""
    side = 168 / (12 // r)  # the region's side, input pixels
    col, row = min(int(cx / 2 // side), 12 // r - 1), min(int(cy / 2 // side), 12 // r - 1)
    centre_x, centre_y, half = (col + 0.5) * side, (row + 0.5) * side, side * context / 2
    box = [max(0.0, centre_x - half), max(0.0, centre_y - half),
           min(168.0, centre_x + half), min(168.0, centre_y + half)]
    return tuple(int(round(2 * v)) for v in box)
