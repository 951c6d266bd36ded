"""rovit_jax: region-aware open-vocabulary ViT pretraining and detection in JAX/Flax."""

__version__ = "0.1.0"
