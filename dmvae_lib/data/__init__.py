"""Data: the embedded shapes, image folders, SSL views, latent caches, reference distributions."""
