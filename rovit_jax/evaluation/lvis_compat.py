"""The official LVIS API (`lvis` 0.5.3) under numpy 2.

lvis 0.5.3 (the last release) calls `np.float` in `LVISEval.accumulate`; numpy 1.24 removed that
alias (and `np.int`, `np.object`, `np.str`, `np.complex`), so evaluation fails with an
AttributeError under numpy 2. `import_lvis()` puts the missing aliases back (each bound to the
Python builtin it always meant) and then imports the package. The aliases are restored on the
process-wide `numpy` module, so they are visible to all code in the process.

The project's own evaluator (`rovit_jax.evaluation.detection.evaluate_lvis`) does not need this
module; it is the reference implementation used by tests and by the timing benchmark. Note that
importing `lvis` also calls `logging.basicConfig` (a side effect of the package itself).
"""

from __future__ import annotations

import logging
import types

import numpy as np

# Aliases removed by numpy 1.24, mapped to the builtins they stood for.
_REMOVED_NUMPY_ALIASES: dict[str, type] = {
    "float": float,
    "int": int,
    "object": object,
    "str": str,
    "complex": complex,
}


def restore_numpy_aliases() -> list[str]:
    """Restores the builtin aliases numpy 1.24 removed; returns the names it had to add."""
    added = []
    # vars() rather than hasattr(): numpy's module __getattr__ warns or raises for these names.
    namespace = vars(np)
    for name, builtin in _REMOVED_NUMPY_ALIASES.items():
        if name not in namespace:
            setattr(np, name, builtin)
            added.append(name)
    return added


def import_lvis() -> types.ModuleType:
    """Returns the `lvis` module (`LVIS`, `LVISResults`, `LVISEval`) usable under numpy 2."""
    restore_numpy_aliases()
    # lvis also calls Logger.warn, which Python 3.13 removed; alias it to warning() if missing.
    if not hasattr(logging.Logger, "warn"):
        logging.Logger.warn = logging.Logger.warning  # type: ignore[attr-defined]
    import lvis

    return lvis
