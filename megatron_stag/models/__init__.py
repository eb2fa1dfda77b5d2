"""Model classes built from megatron-core modules."""
