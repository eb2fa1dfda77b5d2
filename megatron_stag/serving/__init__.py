"""Serving: one model (`model.py`, plain PyTorch), one staggered decode engine (`engine.py`), the
megatron-checkpoint conversion (`convert.py`), DeepSpeed sharding (`deepspeed.py`) and the CLI."""
