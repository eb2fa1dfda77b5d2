"""Platform adapters: what megatron-core needs to run where its CUDA assumptions do not hold."""
