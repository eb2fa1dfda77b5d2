"""Model configuration (TransformerConfig subclasses) and the pure placement of sections on stages."""
