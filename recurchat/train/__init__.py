"""Training: the loop, optimizers, checkpoints, telemetry."""
