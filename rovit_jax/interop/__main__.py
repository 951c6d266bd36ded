r"""Weight interchange from the command line.

Import public weights into a pretraining workdir (step-0 checkpoint; see interop.workdir):

  python -m rovit_jax.interop import --from timm|open_clip|big_vision --weights FILE \
      --config configs/X.py[:arg] --out WORKDIR
  python -m rovit_jax.main --config=configs/X.py[:arg] --workdir=WORKDIR   # pretrain from them

The config must describe the checkpoint's architecture (variant, patch size, embed_dim,
vocabulary size, pooling); position embeddings are resized to its grid. An open_clip checkpoint
needs no config: its architecture is read from the tensors (interop.open_clip_run), with
open_clip's model config for the rest:

  python -m rovit_jax.interop import --from open_clip --weights FILE --out WORKDIR \
      [--model ViT-B-16]

a big_vision (SigLIP) .npz likewise, given its SentencePiece model (interop.big_vision_run), and
a Hugging Face CLIPModel / SiglipModel state dict given its config.json (interop.hf_layouts):

  python -m rovit_jax.interop import --from big_vision --weights FILE.npz \
      --tokenizer c4_en.model --out WORKDIR
  python -m rovit_jax.interop import --from hf --weights model.safetensors \
      --hf_config config.json [--tokenizer spiece.model] --out WORKDIR The import report is
printed and written to WORKDIR/import_report.{txt,json}. Weight files, workdirs and output
folders may be bucket URLs (gs://...).

Export a pretraining run's towers (latest checkpoint, or --step):

  python -m rovit_jax.interop export --checkpoint WORKDIR --out DIR

writes DIR/image_tower.safetensors (timm ViT; kwargs in DIR/timm_kwargs.json),
DIR/text_tower.safetensors and DIR/text_tower.json (layouts in interop.timm_export); with
--layout open_clip, DIR/open_clip_model.safetensors and DIR/open_clip_config.json, both towers as
open_clip's CLIP (interop.open_clip_export; a CLIP-like run, e.g. an imported one).
"""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from rovit_jax import paths  # noqa: E402


def _grid(text: str | None) -> tuple[int, int] | None:
    if not text:
        return None
    parts = text.replace("x", ",").split(",")
    if len(parts) != 2:
        raise ValueError(f"--source_grid must be 'gh,gw', got {text!r}")
    return int(parts[0]), int(parts[1])


def _import(args: argparse.Namespace) -> int:
    from rovit_jax.config_files import load_config
    from rovit_jax.interop import import_weights as iw
    from rovit_jax.interop.towers import init_params, resolve_model
    from rovit_jax.interop.workdir import check_new_workdir, write_init_workdir

    check_new_workdir(args.out)  # before the (slow) import
    if args.source_format == "hf":
        return _import_hf_run(args)
    if args.config is None:
        if args.source_format == "open_clip":
            return _import_open_clip_run(args)
        if args.source_format == "big_vision":
            return _import_big_vision_run(args)
        raise ValueError(
            f"--from {args.source_format} needs --config (a pretraining config describing "
            "the checkpoint); only open_clip and big_vision checkpoints are read without one"
        )
    config = load_config(args.config)
    if config.get("task", "pretrain") != "pretrain":
        raise ValueError(
            f"--config {args.config} is a {config.task!r} config; give a pretraining one"
        )
    grid = _grid(args.source_grid)
    if args.source_format == "timm":
        params_img, report = iw.import_timm(
            args.weights, config, source_grid=grid, prefix=args.prefix
        )
        params = init_params(resolve_model(config), int(config.seed))
        params["img"] = params_img
        report.notes.append(
            "a timm checkpoint holds only an image tower: img_proj, txt, txt_proj, t"
            + (", b" if "b" in params else "")
            + " are kept at init"
        )
    elif args.source_format == "open_clip":
        model_cfg = None
        if args.open_clip_config:
            model_cfg = paths.read_json(args.open_clip_config)
        params, report = iw.import_open_clip(
            args.weights, config, model_cfg=model_cfg, source_grid=grid
        )
    else:
        params, report = iw.import_big_vision(args.weights, config, source_grid=grid)
    step_dir = write_init_workdir(config, params, args.out)
    _write_report(args, report)
    print(
        f"wrote {step_dir}; continue with: python -m rovit_jax.main --config={args.config} "
        f"--workdir={args.out}"
    )
    return 0


def _import_open_clip_run(args: argparse.Namespace) -> int:
    from rovit_jax.interop.open_clip_run import import_open_clip_run

    model = paths.read_json(args.open_clip_config) if args.open_clip_config else args.model
    _, report, step_dir = import_open_clip_run(args.weights, args.out, model=model)
    return _done(args, report, step_dir)


def _import_big_vision_run(args: argparse.Namespace) -> int:
    from rovit_jax.interop.big_vision_run import import_big_vision_run

    if not args.tokenizer:
        raise ValueError(
            "--from big_vision without --config needs --tokenizer: the checkpoint's "
            "SentencePiece model (SigLIP English: c4_en)"
        )
    _, report, step_dir = import_big_vision_run(args.weights, args.out, tokenizer=args.tokenizer)
    return _done(args, report, step_dir)


def _import_hf_run(args: argparse.Namespace) -> int:
    from rovit_jax.interop.hf_layouts import import_hf_run

    if not args.hf_config or args.config:
        raise ValueError(
            "--from hf takes the model's Hugging Face config.json (--hf_config), not --config"
        )
    _, report, step_dir = import_hf_run(
        args.weights, args.out, hf_config=paths.read_json(args.hf_config), tokenizer=args.tokenizer
    )
    return _done(args, report, step_dir)


def _done(args: argparse.Namespace, report, step_dir: str) -> int:
    """Reports an import whose config was read from the checkpoint."""
    _write_report(args, report)
    print(
        f"wrote {step_dir} and {os.path.join(args.out, 'config.json')} (read from the "
        "checkpoint); use it as a detection config's init.pretrain_workdir, or "
        f"Predictor.from_checkpoint({args.out!r})"
    )
    return 0


def _write_report(args: argparse.Namespace, report) -> None:
    paths.write_text(os.path.join(args.out, "import_report.txt"), str(report) + "\n")
    paths.write_json(os.path.join(args.out, "import_report.json"), report.to_dict(), indent=2)
    print(str(report) if args.verbose else report.summary())
    for note in [] if args.verbose else report.notes:
        print(f"  note: {note}")


def _export(args: argparse.Namespace) -> int:
    from rovit_jax.interop.timm_export import (
        export_image_tower_safetensors,
        export_text_tower_safetensors,
    )
    from rovit_jax.runs import load_pretrained_towers

    config, params, step = load_pretrained_towers(args.checkpoint, step=args.step)
    if args.layout == "open_clip":
        return _export_open_clip(args, config, params, step)
    paths.makedirs(args.out)
    image_path = os.path.join(args.out, "image_tower.safetensors")
    text_path = os.path.join(args.out, "text_tower.safetensors")
    kwargs = export_image_tower_safetensors(params, config, image_path)
    settings = export_text_tower_safetensors(params, config, text_path)
    paths.write_json(os.path.join(args.out, "timm_kwargs.json"), kwargs, indent=2)
    paths.write_json(os.path.join(args.out, "text_tower.json"), settings, indent=2)
    print(f"exported step {step} of {args.checkpoint}: {image_path}, {text_path}")
    return 0


def _export_open_clip(args: argparse.Namespace, config, params, step: int) -> int:
    import io

    from safetensors.numpy import save

    from rovit_jax.interop.open_clip_export import open_clip_model_config, open_clip_state_dict

    model_cfg = open_clip_model_config(config)  # refuses before anything is written
    tensors = open_clip_state_dict(params, config)
    paths.makedirs(args.out)
    weights = os.path.join(args.out, "open_clip_model.safetensors")
    paths.write_bytes(weights, io.BytesIO(save(tensors)).getvalue())
    paths.write_json(os.path.join(args.out, "open_clip_config.json"), model_cfg, indent=2)
    print(
        f"exported step {step} of {args.checkpoint}: {weights}; load it with "
        "open_clip.model.CLIP(**json.load(open('open_clip_config.json'))).load_state_dict(...)"
    )
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m rovit_jax.interop",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    sub = parser.add_subparsers(dest="command", required=True)
    imp = sub.add_parser("import", help="import public weights into a pretraining workdir")
    imp.add_argument(
        "--from",
        dest="source_format",
        required=True,
        choices=("timm", "open_clip", "big_vision", "hf"),
    )
    imp.add_argument("--weights", required=True, help=".safetensors, .pt/.pth/.bin or .npz")
    imp.add_argument(
        "--config",
        default=None,
        help="pretraining config: path.py[:arg] or .json (optional for open_clip: the "
        "architecture is read from the checkpoint)",
    )
    imp.add_argument(
        "--model",
        default=None,
        help="open_clip: the model's name in open_clip (e.g. ViT-B-16, ViT-B-16-quickgelu) "
        "for what the weights do not show (heads, activation, eps, preprocessing)",
    )
    imp.add_argument("--out", required=True, help="new workdir")
    imp.add_argument(
        "--source_grid", default=None, help="checkpoint patch grid 'gh,gw' if not square"
    )
    imp.add_argument("--prefix", default="", help="timm: read only tensors under this prefix")
    imp.add_argument(
        "--hf_config",
        default=None,
        help="hf: the model's config.json (a CLIPModel or SiglipModel state dict's)",
    )
    imp.add_argument(
        "--tokenizer",
        default=None,
        help="big_vision without --config: the checkpoint's SentencePiece model (copied into "
        "the run)",
    )
    imp.add_argument(
        "--open_clip_config",
        default=None,
        help="open_clip: the model config JSON (instead of --model)",
    )
    imp.add_argument("--verbose", action="store_true", help="print the whole report")
    exp = sub.add_parser("export", help="export a pretraining run's towers as safetensors")
    exp.add_argument("--checkpoint", required=True, help="a pretraining workdir")
    exp.add_argument("--out", required=True, help="output directory")
    exp.add_argument("--step", type=int, default=None, help="checkpoint step (default: latest)")
    exp.add_argument(
        "--layout",
        choices=("timm", "open_clip"),
        default="timm",
        help="timm: image tower as a timm ViT and the text tower (default); open_clip: both "
        "towers as an open_clip CLIP state dict and its model config",
    )
    args = parser.parse_args(argv)
    if args.command == "import":
        return _import(args)
    return _export(args)


if __name__ == "__main__":
    sys.exit(main())
