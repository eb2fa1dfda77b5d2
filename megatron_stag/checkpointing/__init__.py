"""Checkpoints: megatron torch_dist shards plus plain-data metadata, written atomically."""
