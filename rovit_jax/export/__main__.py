r"""Exports a detection run's detector.

  python -m rovit_jax.export --checkpoint runs/shapes_detect --format saved_model --out det_sm
  python -m rovit_jax.export --checkpoint runs/shapes_detect --format jax --out det.jax

saved_model: a TensorFlow SavedModel directory (signatures serving_default and embed_text, with
rovit_export.json describing inputs, outputs and the tokenizer); jax: a serialized jax.export
artifact (parameters baked in) plus `<out>.json`. Bad input ends with exit code 2 and one line.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

FORMATS = ("saved_model", "jax")


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m rovit_jax.export",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument("--checkpoint", required=True, help="a detection run's workdir")
    p.add_argument("--format", required=True, choices=FORMATS)
    p.add_argument("--out", required=True, help="SavedModel folder or .jax file")
    p.add_argument("--image_size", type=int, default=None, help="canvas S (default the run's)")
    p.add_argument("--max_queries", type=int, default=16, help="text-embedding rows Q")
    p.add_argument("--batch_size", type=int, default=None, help="fixed batch (default any)")
    p.add_argument("--step", type=int, default=None, help="checkpoint step (default latest)")
    p.add_argument("--no_fusion", action="store_true", help="detector scores only (no VLM)")
    args = p.parse_args(argv)

    from rovit_jax.export import export_jax, export_saved_model

    kwargs = dict(
        image_size=args.image_size,
        max_queries=args.max_queries,
        batch_size=args.batch_size,
        fusion=not args.no_fusion,
        step=args.step,
    )
    try:
        if args.format == "saved_model":
            export_saved_model(args.checkpoint, args.out, **kwargs)
        else:
            export_jax(args.checkpoint, args.out, **kwargs)
    except (OSError, ValueError) as e:
        print(f"error: {' '.join(str(e).split())}", file=sys.stderr)
        return 2
    print(f"exported {args.checkpoint} ({args.format}) to {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
