"""Model: layers, the recursive LM, depth samplers and FLOPs accounting."""
