"""The math: the flow path, samplers, distribution-matching
objectives, distances, 2-D toy targets (torch only)."""
