"""What every layer uses: device choice, run folders and checkpoint files, torchrun/DDP helpers."""
