"""One module per notebook: toy (10), tokenizer (20),
teacher (30), joint (40), latents (50), generation (60)."""
