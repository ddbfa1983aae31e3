"""Model families, the checkpoint loader and offline tiny checkpoints."""
