"""Speed benchmarks; each script prints a markdown table for bench/RESULTS.md."""
