"""Data: tokenizer, embedded corpus and token caches, batch loaders.

Trainer entry points: `corpus.prepare_data`, `loader.TokenLoader`, `loader.eval_batches`. Exercised by
`pytest tests/data`.
"""
