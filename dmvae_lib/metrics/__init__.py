"""Measurements: image metrics and labelled Fréchet distances, protocol records, probes, 2-D embeddings."""
