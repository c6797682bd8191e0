"""Command line: ``python -m studio train | generate | templates``.

Bad input ends with exit code 2 and a one-line message (no traceback), and never touches the
template store. ``STUDIO_DEBUG=1`` shows tracebacks of unexpected errors.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import time
from pathlib import Path

from . import config
from .errors import StudioError

EXIT_INPUT, EXIT_INTERNAL, EXIT_INTERRUPTED = 2, 1, 130


def _recipe_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("recipe (defaults: the paper's)")
    g.add_argument("--preset", default="paper", help="paper | quick | high_fidelity")
    g.add_argument("--steps", type=int, help="optimiser steps (300)")
    g.add_argument("--grad-accum", type=int, help="gradient accumulation (4)")
    g.add_argument("--lr", type=float, help="Adam learning rate (1e-4)")
    g.add_argument("--rank", type=int, help="LoRA rank (32)")
    g.add_argument("--alpha", type=float, help="LoRA alpha (= rank)")
    g.add_argument("--sampler", help="style_friendly | sd3 | uniform")
    g.add_argument("--mu", type=float, help="log-SNR mean of the style-friendly sampler (-6)")
    g.add_argument("--sigma", type=float, help="log-SNR std (FLUX 3, SD3.5 2)")
    g.add_argument("--shift", type=float, help="SD3 sampler shift (3)")
    g.add_argument("--offset-noise", type=float, help="offset noise strength (0; paper's best 0.01)")
    g.add_argument("--noise-prior", action="store_true", default=None,
                   help="style noise prior: draw the training noise from the references' mean/std "
                        "(Diffusion in Style) and store it with the template")
    g.add_argument("--resolution", type=int, help="pixel budget side (512; tiny 64)")
    g.add_argument("--seed", type=int)
    g.add_argument("--precision", help="auto | bf16 | fp16 | fp32")
    g.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=None)
    g.add_argument("--preview-every", type=int, help="steps between previews (50; 0 = off)")
    g.add_argument("--preview-steps", type=int, help="denoising steps per preview")
    g.add_argument("--preview-prompt", help="an extra content prompt to preview")
    g.add_argument("--checkpoint-every", type=int, help="steps between checkpoints (50)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m studio", description="Style Template Studio")
    parser.add_argument("--store", help="template store folder (env STUDIO_STORE, default ./templates_store)")
    sub = parser.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="fine-tune a style template from reference images")
    t.add_argument("--images", nargs="*", default=[], help="1 to 20 reference images")
    t.add_argument("--style", required=True, help='style prompt, e.g. "watercolor painting"')
    t.add_argument("--name", help="template name (default: from the style prompt)")
    t.add_argument("--captions", nargs="+", help="optional content caption per image")
    t.add_argument("--backbone", default="tiny", help="tiny | flux-dev | sd3.5-large | sd3.5-medium | folder | hub id")
    t.add_argument("--run-dir", help="work folder (default: a new folder under ./runs); reuse one to resume")
    _recipe_args(t)

    g = sub.add_parser("generate", help="text-to-image with a template")
    g.add_argument("--template", help="template id (omit for the bare base model)")
    g.add_argument("--prompt", required=True)
    g.add_argument("--out", default="outputs", help="output folder")
    g.add_argument("--backbone", help="default: the template's backbone")
    g.add_argument("--scale", type=float, default=1.0, help="LoRA strength")
    g.add_argument("--seed", type=int, default=0)
    g.add_argument("--steps", type=int, help="denoising steps (28)")
    g.add_argument("--guidance", type=float, help="guidance (7.0)")
    g.add_argument("--aspect", default="1:1")
    g.add_argument("--resolution", type=int)
    g.add_argument("--width", type=int)
    g.add_argument("--height", type=int)
    g.add_argument("-n", "--num-images", type=int, default=1)
    g.add_argument("--no-style-wrap", action="store_true", help='do not append "in {style} style"')
    g.add_argument("--mix", action="append", default=[], metavar="ID:SCALE",
                   help="mix another template in at this strength (repeatable)")
    g.add_argument("--style-schedule", type=float, metavar="X",
                   help="apply the template only in the first X (0-1) of the denoising steps")
    g.add_argument("--fusion-weight", type=float, default=1.0,
                   help="per step: base + W * (template - base); 1 = plain template, 0 = base model")
    g.add_argument("--noise-prior", action="store_true",
                   help="start from the template's style noise prior (trained with --noise-prior)")

    m = sub.add_parser("templates", help="list, export, import, rename or delete templates")
    ms = m.add_subparsers(dest="action", required=True)
    ls = ms.add_parser("list")
    ls.add_argument("query", nargs="?")
    ex = ms.add_parser("export")
    ex.add_argument("template")
    ex.add_argument("--format", default="zip", choices=["zip", "safetensors", "comfy"])
    ex.add_argument("--out", default=".")
    im = ms.add_parser("import")
    im.add_argument("file")
    im.add_argument("--name")
    rn = ms.add_parser("rename")
    rn.add_argument("template")
    rn.add_argument("name")
    de = ms.add_parser("delete")
    de.add_argument("template")
    return parser


def cmd_train(args: argparse.Namespace, store) -> int:
    from .backbones import load_backbone, resolve
    from .images import load_reference_images, validate_name, validate_prompt
    from .recipe import Recipe

    # Validate everything before loading a model or writing anything.
    style = validate_prompt(args.style)
    name = validate_name(args.name or style[:60])
    images = load_reference_images(args.images)
    if args.captions and len(args.captions) != len(images):
        raise StudioError(f"give one caption per image ({len(images)}), or none")
    overrides = {k: getattr(args, k) for k in (
        "steps", "grad_accum", "lr", "rank", "alpha", "sampler", "mu", "sigma", "shift", "offset_noise",
        "noise_prior", "resolution", "seed", "precision", "gradient_checkpointing", "preview_every", "preview_steps",
        "preview_prompt", "checkpoint_every")}
    recipe = Recipe.from_preset(args.preset, **overrides).validate()
    spec = resolve(args.backbone)

    from .progress import TqdmObserver
    from .training import TrainRequest, prepare_run, train

    stamp = f"{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
    run_dir = Path(args.run_dir) if args.run_dir else config.runs_dir() / stamp
    print(f"loading backbone {spec.backbone_id} ...", file=sys.stderr)
    backbone = load_backbone(spec.backbone_id, precision=recipe.precision)
    if spec.is_tiny:
        print("note: 'tiny' is a small random-weight demo model; use --backbone flux-dev on a GPU "
              "for real styles", file=sys.stderr)
    prepare_run(TrainRequest(images, style, name, recipe, args.captions), run_dir, backbone.backbone_id,
                backbone.family, backbone.default_resolution)
    print(f"run folder: {run_dir}", file=sys.stderr)
    with TqdmObserver(recipe.steps) as observer:
        result = train(backbone, run_dir, observer)
    info = publish(store, result, name)
    print(info.path)
    return 0


def publish(store, result: Path, name: str):
    """Copy a finished run's template folder into the store (atomically)."""
    staging = store.new_staging()
    shutil.copytree(result, staging, dirs_exist_ok=True)
    return store.create(staging, name)


def cmd_generate(args: argparse.Namespace, store) -> int:
    from .backbones import load_backbone
    from .generation import GenerateOptions, check_request, generate
    from .mixing import parse_mix_arg, resolve_mix

    options = GenerateOptions(
        prompt=args.prompt, lora_scale=args.scale, seed=args.seed, steps=args.steps, guidance=args.guidance,
        aspect=args.aspect, resolution=args.resolution, width=args.width, height=args.height,
        num_images=args.num_images, wrap_style=not args.no_style_wrap,
        mix=[parse_mix_arg(m) for m in args.mix], style_schedule=args.style_schedule,
        fusion_weight=args.fusion_weight, noise_prior=args.noise_prior,
    ).validate()
    template = store.get(args.template) if args.template else None
    mix = resolve_mix(store, options.mix)
    check_request(options, (template.path, template.meta) if template else None, mix)  # before loading a model
    backbone_id = args.backbone or (template.backbone if template else "tiny")
    backbone = load_backbone(backbone_id)
    files = generate(backbone, options, Path(args.out),
                     (template.path, template.meta) if template else None,
                     stem=template.id if template else "base", mix=mix)
    for f in files:
        print(f)
    return 0


def cmd_templates(args: argparse.Namespace, store) -> int:
    if args.action == "list":
        for info in store.list(args.query):
            print(f"{info.id}\t{info.name}\t{info.style_prompt}\t{info.backbone}\t{info.created}")
    elif args.action == "export":
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        export = {"zip": store.export_zip, "safetensors": store.export_safetensors,
                  "comfy": store.export_comfy}[args.format]
        print(export(args.template, out))
    elif args.action == "import":
        print(store.import_file(Path(args.file), args.name).path)
    elif args.action == "rename":
        print(store.rename(args.template, args.name).name)
    elif args.action == "delete":
        store.delete(args.template)
        print(f"deleted {args.template}")
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        from .templates import TemplateStore

        store = TemplateStore(Path(args.store) if args.store else config.store_dir())
        command = {"train": cmd_train, "generate": cmd_generate, "templates": cmd_templates}[args.command]
        return command(args, store)
    except StudioError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_INPUT
    except KeyboardInterrupt:
        print("interrupted; run the same command with --run-dir to resume a training", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as exc:  # a bug or the machine (out of memory...): one line, details on demand
        import torch

        if isinstance(exc, torch.OutOfMemoryError):
            print("error: out of GPU memory; try a lower --resolution or --rank", file=sys.stderr)
            return EXIT_INPUT
        if os.environ.get("STUDIO_DEBUG"):
            raise
        print(f"internal error: {type(exc).__name__}: {exc} (set STUDIO_DEBUG=1 for details)", file=sys.stderr)
        return EXIT_INTERNAL


if __name__ == "__main__":
    sys.exit(main())
