"""The model: networks, posterior, priors, likelihoods and the training objectives."""

# modules that register themselves: the objectives betatcvae, dipvae-i and dipvae-ii beside elbo and iwae;
# --arch hierarchical with VAE.from_config
from . import factor_objectives, hierarchical  # noqa: F401
