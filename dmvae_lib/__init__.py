"""dmvae_lib: the library behind the DMVAE workbook (Distribution Matching VAE, arXiv 2512.07778).

Glossary (one name per concept):
    real_net   the frozen reference velocity net, fitted by flow matching on the reference distribution
               (the notebooks may call it "teacher").
    fake_net   the online velocity net that tracks the current latent (or point) distribution.
    encoder, decoder, tokenizer   the autoencoder parts.
    z          the raw encoder output; `latents` the normalised z.
    x_t        a point on the path x_t = t·data + (1 − t)·noise; t = 0 noise, t = 1 data.
    v          a velocity, the nets' output: net(x_t, t, y=None) -> v.
    data_hat   x_t + (1 − t)·v, the data prediction.

Architecture (each layer imports only the layers above it in this list; tests/test_architecture.py):
    core/      the math, tensors and callables only: flow, samplers, dmd, distances, toy2d
    runtime/   device choice, run folders and checkpoint files, torchrun/DDP helpers
    models/    lightning_dit, score_nets, tokenizer, projection_heads, recon_losses, ssl_encoder
    configs/   typed, frozen configurations and their presets (smoke, cpu, imagenet256)
    data/      shapes_dataset, image_folders, images, views, latent_cache, latents, references
    metrics/   image_metrics, distributions, reconstruction, evaluation, probes, embedding
    train/     loop (the only training loop), phases (step functions), ssl, velocity, artifacts (save/load)
    viz/       plotly figures and the figure store
    stages/    one module per notebook: toy 10, tokenizer 20, teacher 30, joint 40, latents 50, generation 60
    workflow/  session (a notebook's setup), pipeline and study (papermill), ddp_fit (torchrun)
`python -m dmvae_lib` runs the pipeline.
"""

__version__ = "0.1.0"
