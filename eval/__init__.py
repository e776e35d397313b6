"""Evaluation tools: single-image prediction with the Blink trace, threshold calibration, benchmarks."""
