"""Bridges to other ecosystems: Llama-family checkpoints in (transformers folders and GGUF files), retrofitting a
standard checkpoint into a recursive one. `recurchat export hf` (the way out) lives in export/."""
