"""Datasets and text tokenization.

Submodules are imported explicitly (e.g. `from rovit_jax.data import shapes_tfds`) so that importing
this package stays cheap and never pulls in TensorFlow.
"""
