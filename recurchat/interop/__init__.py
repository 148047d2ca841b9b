"""Bridges to other ecosystems: Llama-family checkpoints in (transformers folders and GGUF files), retrofitting a
standard checkpoint into a recursive one; and the way out, `recurchat export hf` (hf_export.py, hf_modeling.py,
model_card.py)."""
