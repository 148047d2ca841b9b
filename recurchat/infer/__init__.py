"""Inference: sampling, KV caches for recursion, exit criteria and depth plans, the engine, its step-level batcher
and loop-count speculation. HTTP serving stands on it in serve/; the sample and chat commands are in cli/generate.py."""
