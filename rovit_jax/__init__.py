"""rovit_jax: region-aware open-vocabulary ViT pretraining and detection in JAX/Flax."""

from rovit_jax import paths  # noqa: F401  (chooses the gs:// backend before any remote path is used)

__version__ = "0.1.0"
