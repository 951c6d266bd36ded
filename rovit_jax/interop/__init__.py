"""Weight interchange with PyTorch and big_vision.

- `timm_export`: the image tower as a timm ViT safetensors file (`timm_model_kwargs` gives the
  model arguments), the text tower in a documented safetensors layout.
- `import_weights`: timm ViTs, open_clip CLIP models and big_vision SigLIP .npz checkpoints into
  this project's models, with an `ImportReport`.
- `workdir`: a pretraining workdir at step 0 holding imported weights.
- ``python -m rovit_jax.interop import|export``: the same from the command line.
"""

from rovit_jax.interop.import_weights import import_big_vision, import_open_clip, import_timm
from rovit_jax.interop.report import ImportReport
from rovit_jax.interop.timm_export import (
    export_image_tower_safetensors,
    export_text_tower_safetensors,
    read_export,
    timm_model_kwargs,
)

__all__ = [
    "ImportReport",
    "export_image_tower_safetensors",
    "export_text_tower_safetensors",
    "import_big_vision",
    "import_open_clip",
    "import_timm",
    "read_export",
    "timm_model_kwargs",
]
