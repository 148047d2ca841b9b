"""Benchmarks: `recurchat bench train|infer` print ratios measured side by side in one run."""
