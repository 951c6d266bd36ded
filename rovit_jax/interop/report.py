"""What an import did: parameters loaded, checkpoint tensors not loaded (and why), parameters
missing from the checkpoint (kept at their initial values), and architecture caveats."""

from __future__ import annotations

import dataclasses
from typing import Any

__all__ = ["ImportReport"]


@dataclasses.dataclass
class ImportReport:
    """Outcome of importing a checkpoint into a rovit_jax model.

    Attributes:
      source: the file read (or "<state dict>").
      format: "timm", "open_clip" or "big_vision".
      loaded: (parameter path, checkpoint tensor(s), note) for every parameter set from the file.
      not_loaded: (checkpoint tensor, reason) for every tensor of the file that was not used.
      missing: (parameter path, reason) for every parameter the file did not provide; these keep
        their initial values.
      notes: architecture differences the weights cannot show (activation, LayerNorm epsilon,
        attention mask, pooling) that make outputs differ from the source model.
    """

    source: str
    format: str
    loaded: list[tuple[str, str, str]] = dataclasses.field(default_factory=list)
    not_loaded: list[tuple[str, str]] = dataclasses.field(default_factory=list)
    missing: list[tuple[str, str]] = dataclasses.field(default_factory=list)
    notes: list[str] = dataclasses.field(default_factory=list)

    def missing_paths(self) -> set[str]:
        return {path for path, _ in self.missing}

    def summary(self) -> str:
        return (
            f"{self.format} import from {self.source}: {len(self.loaded)} parameters loaded, "
            f"{len(self.not_loaded)} checkpoint tensors not loaded, {len(self.missing)} "
            "parameters missing (kept at init)"
        )

    def to_dict(self) -> dict[str, Any]:
        return {
            "source": self.source,
            "format": self.format,
            "loaded": [dict(param=p, source=s, note=n) for p, s, n in self.loaded],
            "not_loaded": [dict(tensor=k, reason=r) for k, r in self.not_loaded],
            "missing": [dict(param=p, reason=r) for p, r in self.missing],
            "notes": list(self.notes),
        }

    def __str__(self) -> str:
        lines = [self.summary()]
        if self.notes:
            lines.append("notes:")
            lines += [f"  - {n}" for n in self.notes]
        if self.not_loaded:
            lines.append("not loaded:")
            lines += [f"  {k}: {r}" for k, r in self.not_loaded]
        if self.missing:
            lines.append("missing (kept at init):")
            lines += [f"  {p}: {r}" for p, r in self.missing]
        lines.append("loaded:")
        for path, src, note in self.loaded:
            lines.append(f"  {path} <- {src}" + (f" ({note})" if note else ""))
        return "\n".join(lines)
