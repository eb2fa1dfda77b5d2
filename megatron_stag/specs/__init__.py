"""megatron-core ModuleSpecs for StagFormer sections (local and Transformer Engine backends)."""
