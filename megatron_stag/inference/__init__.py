"""Staggered decoding: per-section caches, one-process and one-section-per-rank generation, sampling."""
