"""The evaluation harness: modes, batched bucketed generation with resume, scoring, results files."""
