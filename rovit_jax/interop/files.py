"""Reading weight files without unpickling anything.

Accepted formats (chosen by extension):

  .safetensors                 safetensors (any dtype; floats are returned as float32)
  .pt .pth .bin .ckpt          PyTorch files read with ``torch.load(..., weights_only=True)``:
                               only tensors and plain containers; a file that needs any other
                               Python object is refused
  .npz                         NumPy archives read with ``allow_pickle=False`` (big_vision)

Pickle files (.pkl, .pickle) are refused outright. A path may be local or a bucket URL (gs://...).
"""

from __future__ import annotations

import os
import pickle
from collections.abc import Mapping
from typing import Any

import numpy as np

from rovit_jax import paths

__all__ = ["load_tensors", "to_numpy_dict", "SAFETENSORS_EXTS", "TORCH_EXTS", "NPZ_EXTS"]

SAFETENSORS_EXTS = (".safetensors",)
TORCH_EXTS = (".pt", ".pth", ".bin", ".ckpt")
NPZ_EXTS = (".npz",)
PICKLE_EXTS = (".pkl", ".pickle")
# Containers training scripts wrap state dicts in (open_clip: {"epoch", "state_dict", ...}).
_WRAPPER_KEYS = ("state_dict", "model", "module")


def _to_numpy(value: Any) -> np.ndarray:
    """A torch tensor or array as numpy; floating point (incl. bf16/fp16) becomes float32."""
    if hasattr(value, "detach"):  # torch.Tensor, without importing torch here
        value = value.detach().cpu()
        if value.is_floating_point():
            value = value.float()
        return value.numpy()
    arr = np.asarray(value)
    if np.issubdtype(arr.dtype, np.floating):
        arr = arr.astype(np.float32)
    return arr


def _is_tensor(value: Any) -> bool:
    return hasattr(value, "detach") or isinstance(value, np.ndarray)


def to_numpy_dict(state: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """A state dict (torch tensors or arrays) as {name: numpy array}, unwrapping training-script
    containers ({"state_dict": ...}) and a DataParallel "module." prefix. Non-tensor entries
    (epoch counters, optimizer settings) are dropped."""
    state = dict(state)
    for key in _WRAPPER_KEYS:
        inner = state.get(key)
        if isinstance(inner, Mapping) and not _is_tensor(inner):
            state = dict(inner)
            break
    out = {str(k): _to_numpy(v) for k, v in state.items() if _is_tensor(v)}
    if out and all(k.startswith("module.") for k in out):
        out = {k[len("module.") :]: v for k, v in out.items()}
    return out


def _load_safetensors(path: str) -> dict[str, np.ndarray]:
    from safetensors import safe_open

    # The torch framework reads every dtype (numpy has no bfloat16).
    with paths.local_file(path) as local, safe_open(local, framework="pt") as f:
        return {k: _to_numpy(f.get_tensor(k)) for k in f.keys()}


def _load_torch(path: str) -> dict[str, np.ndarray]:
    import torch

    try:
        with paths.local_file(path) as local:
            obj = torch.load(local, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        raise ValueError(
            f"{path} holds Python objects other than tensors (it needs a full unpickle); refusing "
            "to load it. Re-save its state dict with safetensors or torch.save(model.state_dict())"
        ) from e
    except RuntimeError as e:
        raise ValueError(f"{path} is not a readable PyTorch file: {e}") from e
    if not isinstance(obj, Mapping):
        raise ValueError(f"{path} holds a {type(obj).__name__}, not a state dict")
    return to_numpy_dict(obj)


def _load_npz(path: str) -> dict[str, np.ndarray]:
    try:
        with paths.local_file(path) as local, np.load(local, allow_pickle=False) as data:
            return {k: _to_numpy(data[k]) for k in data.files}
    except ValueError as e:
        raise ValueError(
            f"{path} holds object arrays (pickled data); refusing to load it: {e}"
        ) from e


def load_tensors(
    path_or_state_dict: str | os.PathLike | Mapping[str, Any],
) -> dict[str, np.ndarray]:
    """Reads a weight file (or converts an in-memory state dict) to {name: numpy array}.

    Raises:
      FileNotFoundError: naming the path.
      ValueError: for pickle files, unknown extensions, and files holding pickled objects.
    """
    if isinstance(path_or_state_dict, Mapping):
        return to_numpy_dict(path_or_state_dict)
    path = os.fspath(path_or_state_dict)
    if not paths.isfile(path):
        raise FileNotFoundError(f"no weight file {path}")
    ext = os.path.splitext(path)[1].lower()
    if ext in PICKLE_EXTS:
        raise ValueError(
            f"{path} is a pickle file; refusing to unpickle it (arbitrary code execution). Use "
            f"safetensors, a torch state dict ({', '.join(TORCH_EXTS)}) or .npz"
        )
    if ext in SAFETENSORS_EXTS:
        return _load_safetensors(path)
    if ext in TORCH_EXTS:
        return _load_torch(path)
    if ext in NPZ_EXTS:
        return _load_npz(path)
    raise ValueError(
        f"{path}: unknown weight file extension {ext!r}; expected one of "
        f"{SAFETENSORS_EXTS + TORCH_EXTS + NPZ_EXTS}"
    )
