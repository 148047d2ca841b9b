"""Inference: sampling, KV caches for recursion, early exit, the engine and the server."""
