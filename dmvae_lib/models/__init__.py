"""Networks: LightningDiT and toy velocity nets, the tokenizer,
projection heads, reconstruction losses, SSL encoder."""
