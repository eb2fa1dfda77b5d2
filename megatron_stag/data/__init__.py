"""Data: local real text, sentencepiece tokenizers, megatron indexed datasets."""
