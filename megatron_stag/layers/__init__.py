"""StagFormer's attention modules, written against megatron-core's module interfaces."""
