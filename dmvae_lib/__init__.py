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

Math modules (flow, samplers, dmd, toy2d, distances, score_nets) take tensors and callables only;
orchestration (configs, runs, loop, phases, toy_study, session, pipeline) reads configs and writes files.
"""

__version__ = "0.1.0"
