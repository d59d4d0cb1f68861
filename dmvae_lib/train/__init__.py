"""Training: the one loop and its step functions."""
