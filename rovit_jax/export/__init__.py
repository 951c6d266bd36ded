"""Export of the detector: a TensorFlow SavedModel (jax2tf) and a serialized jax.export artifact.

Both take images prepared like evaluation and text embeddings, and return the detector's fixed-size
outputs (see `export.serving`); `python -m rovit_jax.export` is the command line.
"""

from rovit_jax.export.jax_export import export_jax, load_jax_export
from rovit_jax.export.saved_model import export_saved_model

__all__ = ["export_jax", "export_saved_model", "load_jax_export"]
