"""Command line: ``python -m studio train | generate | refine | templates | jobs``.

Bad input ends with exit code 2 and a one-line message (no traceback), and never touches the
template store. ``STUDIO_DEBUG=1`` shows tracebacks of unexpected errors.
"""

from __future__ import annotations

import argparse
import os
import secrets
import shutil
import sys
import tempfile
import time
from pathlib import Path

from studio import config
from studio.errors import StudioError

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
    g.add_argument("--tier", choices=["auto", "bf16", "fp8", "int8", "nf4"],
                   help="memory tier of the base weights: auto picks from the GPU's memory (env STUDIO_TIER); "
                        "bf16 full, fp8 8-bit float, int8 8-bit integer, nf4 4-bit (QLoRA)")
    g.add_argument("--gradient-checkpointing", action=argparse.BooleanOptionalAction, default=None)
    g.add_argument("--micro-batch", type=int,
                   help="samples per forward pass (default: as many of the accumulated samples as memory allows; "
                        "same gradient)")
    g.add_argument("--compile-blocks", action=argparse.BooleanOptionalAction, default=None,
                   help="torch.compile each transformer block (a compile pause first; faster long runs)")
    g.add_argument("--preview-every", type=int, help="steps between previews (50; 0 = off)")
    g.add_argument("--preview-steps", type=int, help="denoising steps per preview")
    g.add_argument("--preview-prompt", help="an extra content prompt to preview")
    g.add_argument("--preview-prompts", nargs="+", metavar="PROMPT",
                   help="up to 4 sample prompts the previews draw (default: the paper's three); kept with the template")
    g.add_argument("--checkpoint-every", type=int, help="steps between checkpoints (50)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="python -m studio", description="Style Template Studio")
    parser.add_argument("--store", help="template store folder (env STUDIO_STORE, default ./templates_store)")
    sub = parser.add_subparsers(dest="command", required=True)

    t = sub.add_parser("train", help="fine-tune a style template from reference images")
    t.add_argument("--images", nargs="*", default=[], help="1 to 20 reference images")
    t.add_argument("--style", required=True, help='style prompt, e.g. "watercolor painting"')
    t.add_argument("--name", help="template name (default: from the style prompt)")
    t.add_argument("--captions", nargs="+", metavar="FILE_OR_TEXT",
                   help="content captions: a file with one line (text, or a JSON object {\"caption\": ...}) per "
                        "image or one JSON object {\"image.png\": \"caption\"}; or one caption per image. "
                        "Without it, image.txt beside each image (kohya / FluxGym) is read")
    t.add_argument("--auto-caption", action="store_true",
                   help="caption the images that have no caption with Florence-2 (content only; env "
                        "STUDIO_CAPTION_MODEL: a local copy)")
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

    r = sub.add_parser("refine", help="round 2 of a template: train again on its references plus the best "
                                      "candidates it makes (StyleDrop's feedback); without --auto / --images "
                                      "it only makes the candidates to pick from")
    r.add_argument("template", help="id of the template to refine (it stays unchanged)")
    how = r.add_mutually_exclusive_group()
    how.add_argument("--auto", action="store_true", help="CLIP makes --candidates pictures and keeps the --top-k "
                                                        "best by style x text score (needs the metric models)")
    how.add_argument("--images", nargs="+", metavar="PNG", help="your favourite candidates (human feedback)")
    r.add_argument("--captions", nargs="+", help="content caption per --images file (default: the prompt stored "
                                                 "in each candidate PNG)")
    r.add_argument("--candidates", type=int, default=8, help="how many candidates to make (8)")
    r.add_argument("--top-k", type=int, default=3, help="with --auto: how many CLIP keeps (3)")
    r.add_argument("--candidate-seed", type=int, default=0, help="seed of the first candidate (0)")
    r.add_argument("--candidate-steps", type=int, help="denoising steps per candidate (28)")
    r.add_argument("--style-metric", choices=["clip_i", "dino"], default="clip_i",
                   help="with --auto: the style score, CLIP-I (StyleDrop's) or DINO")
    r.add_argument("--out", default="candidates", help="where candidates go without --auto / --images")
    r.add_argument("--name", help="name of the new template (default: '<parent> · round 2')")
    r.add_argument("--run-dir", help="work folder (default: a new folder under ./runs); reuse one to resume")
    rg = r.add_argument_group("changes to the parent's recipe (everything else stays the parent's)")
    rg.add_argument("--steps", type=int)
    rg.add_argument("--grad-accum", type=int)
    rg.add_argument("--lr", type=float)
    rg.add_argument("--seed", type=int)
    rg.add_argument("--preview-every", type=int)
    rg.add_argument("--preview-steps", type=int)
    rg.add_argument("--checkpoint-every", type=int)

    m = sub.add_parser("templates", help="list, export, import, rename or delete templates")
    ms = m.add_subparsers(dest="action", required=True)
    ls = ms.add_parser("list")
    ls.add_argument("query", nargs="?")
    ex = ms.add_parser("export")
    ex.add_argument("template")
    ex.add_argument("--format", default="zip", choices=["zip", "safetensors", "comfy"])
    ex.add_argument("--out", default=".")
    ex.add_argument("--precision", choices=["bf16", "fp32"],
                    help="comfy format only: tensor precision (default bf16, half the size of fp32)")
    im = ms.add_parser("import")
    im.add_argument("file")
    im.add_argument("--name")
    rn = ms.add_parser("rename")
    rn.add_argument("template")
    rn.add_argument("name")
    de = ms.add_parser("delete")
    de.add_argument("template")
    se = ms.add_parser("search", help="find templates by text, or by look (CLIP) with --image")
    se.add_argument("query", nargs="?", help="words: names and style prompts match first, then by look")
    se.add_argument("--image", action="append", default=[], metavar="PATH",
                    help="find templates that look like this image (repeat for several images together)")
    se.add_argument("-k", type=int, default=8, help="how many results (8)")
    se.add_argument("--min-similarity", type=float, help="with --image: drop templates less alike (0-1)")
    se.add_argument("--json", action="store_true", help="print JSON instead of tab-separated lines")
    sc = ms.add_parser("scores", help="style scores (DINO, CLIP-I, CLIP-T) of a template's final previews")
    sc.add_argument("template")
    sc.add_argument("--json", action="store_true", help="print JSON (with per-image scores)")

    j = sub.add_parser("jobs", help="jobs of the web app's worker (data folder: env STUDIO_DATA)")
    js = j.add_subparsers(dest="action", required=True)
    jp = js.add_parser("publish", help="save the kept result of a training whose template could not be saved "
                                       "(e.g. the disk was full) as a template")
    jp.add_argument("job", help="the job id (runs/<job id>)")
    jl = js.add_parser("list", help="jobs, newest first: id, state, name, steps, last saved step, note")
    jl.add_argument("--kind", choices=["train", "generate"], help="only trainings or only generations")
    jl.add_argument("-n", type=int, default=30, help="how many (30)")
    jl.add_argument("--json", action="store_true", help="print JSON")
    for action, text_ in (("resume", "queue a cancelled or failed training again, from its last checkpoint"),
                          ("save", "save a cancelled or failed training's last checkpoint as a template"),
                          ("retry", "run an ended job again with the same settings (a new job)"),
                          ("delete", "delete an ended job's folder (a template it made stays)")):
        js.add_parser(action, help=text_).add_argument("job", help="the job id (see `jobs list`)")
    _store_option_everywhere(parser)
    return parser


def _store_option_everywhere(parser: argparse.ArgumentParser) -> None:
    """``--store`` also after any (sub)command, e.g. ``templates list --store X``; the last one given wins.

    Each subparser gets the option with a suppressed default, so it only sets ``args.store`` when it
    is used there and never hides a ``--store`` given before the command."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in dict.fromkeys(action.choices.values()):
                if not any("--store" in a.option_strings for a in sub._actions):
                    sub.add_argument("--store", default=argparse.SUPPRESS,
                                     help="template store folder (env STUDIO_STORE, default ./templates_store)")
                _store_option_everywhere(sub)


def cmd_train(args: argparse.Namespace, store) -> int:
    from studio.engine.backbones import load_backbone, resolve
    from studio.engine.recipe import Recipe
    from studio.media.images import load_reference_images, validate_name, validate_prompt

    # Validate everything before loading a model or writing anything.
    style = validate_prompt(args.style)
    name = validate_name(args.name or style[:60])
    paths = reference_paths(args.images)
    images = load_reference_images(paths)
    captions = cli_captions(args.captions, paths)
    overrides = {k: getattr(args, k) for k in (
        "steps", "grad_accum", "lr", "rank", "alpha", "sampler", "mu", "sigma", "shift", "offset_noise",
        "noise_prior", "resolution", "seed", "precision", "tier", "gradient_checkpointing", "micro_batch",
        "compile_blocks", "preview_every", "preview_steps", "preview_prompt", "preview_prompts", "checkpoint_every")}
    recipe = Recipe.from_preset(args.preset, **overrides).validate()
    spec = resolve(args.backbone)
    if args.auto_caption:
        captions = auto_caption_cli(images, captions, style)

    from studio.engine.progress import TqdmObserver
    from studio.engine.training import TrainRequest, prepare_run, train

    run_dir = Path(args.run_dir) if args.run_dir else new_run_dir("train")
    from studio.engine.memory import plan_training

    plan = plan_training(spec.backbone_id, recipe)  # refuses a run that would not fit, before loading
    print(f"memory: {plan.describe()}", file=sys.stderr)
    print(f"loading backbone {spec.backbone_id} ...", file=sys.stderr)
    backbone = load_backbone(spec.backbone_id, precision=recipe.precision, on_download=show_download,
                             **plan.load_kwargs())
    if spec.is_tiny:
        print("note: 'tiny' is a small random-weight demo model; use --backbone flux-dev on a GPU "
              "for real styles", file=sys.stderr)
    prepare_run(TrainRequest(images, style, name, recipe, captions if any(captions) else None), run_dir,
                backbone.backbone_id,
                backbone.family, backbone.default_resolution)
    print(f"run folder: {run_dir}", file=sys.stderr)
    with TqdmObserver(recipe.steps) as observer:
        result = train(backbone, run_dir, observer, micro_batch=plan.micro_batch)
    info = publish(store, result, name)
    print(info.path)
    return 0


def reference_paths(images: list[str]) -> list[str]:
    """The image files of ``--images``: a dataset zip (images + .txt captions) is unpacked beside the run."""
    from studio.media.datasets import is_dataset_zip, open_dataset_zip

    out: list[str] = []
    for path in images:
        if is_dataset_zip(path):
            dest = Path(tempfile.mkdtemp(prefix="studio-dataset-"))
            out += [str(p) for p, _ in open_dataset_zip(path, dest)]
        else:
            out.append(path)
    return out


def cli_captions(given: list[str] | None, paths: list[str]) -> list[str | None]:
    """One caption (or None) per image: ``--captions FILE``, or one text per image, else the ``.txt`` beside
    each image (kohya / FluxGym). Every caption is checked (length, one line)."""
    from studio.media.captions import check_caption, read_captions_file, read_sidecar

    if given and len(given) == 1 and Path(given[0]).is_file():
        return read_captions_file(given[0], paths)
    if given:
        if len(given) != len(paths):
            raise StudioError(f"give one caption per image ({len(paths)}), or a captions file")
        return [check_caption(c, f"caption of image {i + 1}") for i, c in enumerate(given)]
    return [read_sidecar(p) for p in paths]


def auto_caption_cli(images: list, captions: list[str | None], style: str) -> list[str | None]:
    """Caption the images without a caption with the captioner (progress on stderr); given captions win."""
    from studio.engine.captioner import Captioner
    from studio.media.captions import merge_captions

    todo = [i for i, c in enumerate(captions) if not c]
    if not todo:
        return captions
    captioner = Captioner()
    print(f"auto-captioning {len(todo)} image(s) with {captioner.source} ...", file=sys.stderr)
    captioner.load(on_download=show_download)
    auto: list[str | None] = [None] * len(captions)
    found = captioner.caption([images[i] for i in todo], style,
                              on_progress=lambda done, total: print(f"\r  {done}/{total}", end="", file=sys.stderr))
    print(file=sys.stderr)
    for i, caption in zip(todo, found, strict=True):
        auto[i] = caption
        print(f"  image {i + 1}: {caption or '(nothing but style; trained as the default content)'}", file=sys.stderr)
    captioner.close()
    return merge_captions(captions, auto, len(captions))


def show_download(progress) -> None:
    """A first model download, on one line of the terminal that keeps being rewritten."""
    print("\r" + progress.describe(), end="\n" if progress.finished else "", file=sys.stderr, flush=True)


def publish(store, result: Path, name: str):
    """Copy a finished run's template folder into the store (atomically)."""
    staging = store.new_staging()
    shutil.copytree(result, staging, dirs_exist_ok=True)
    return store.create(staging, name)


def cmd_generate(args: argparse.Namespace, store) -> int:
    from studio.checks import writable_dir
    from studio.engine.backbones import load_backbone, resolve
    from studio.engine.generation import GenerateOptions, check_request, generate, output_size
    from studio.engine.mixing import parse_mix_arg, resolve_mix

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
    output_size(options, resolve(backbone_id).default_resolution, template.meta if template else None)
    out = writable_dir(args.out)
    backbone = load_backbone(backbone_id, on_download=show_download)
    files = generate(backbone, options, out,
                     (template.path, template.meta) if template else None,
                     stem=template.id if template else "base", mix=mix)
    for f in files:
        print(f)
    return 0


def new_run_dir(kind: str) -> Path:
    """A fresh run folder under the runs directory. The random part matters: two runs started in the
    same second by one process must not share a folder (the second would resume the first)."""
    return config.runs_dir() / f"{time.strftime('%Y%m%d-%H%M%S')}-{kind}-{secrets.token_hex(4)}"


def cmd_refine(args: argparse.Namespace, store) -> int:
    """StyleDrop's round 2 (studio.styles.refine): make candidates, or train on the references plus the picks."""
    from tqdm import tqdm

    from studio.engine.backbones import load_backbone, resolve
    from studio.styles import refine

    if args.captions and not args.images:
        raise StudioError("--captions go with --images")
    if not args.auto and not args.images:  # human feedback, step 1: pictures to choose from
        from studio.checks import writable_dir

        parent = store.get(args.template)
        writable_dir(args.out, "candidates folder")
        prompts = refine.candidate_prompts(args.candidates)
        backbone = load_backbone(parent.backbone or "tiny")
        with tqdm(total=len(prompts), desc="candidates", unit="img", file=sys.stderr) as bar:
            found = refine.generate_candidates(backbone, (parent.path, parent.meta), prompts, Path(args.out),
                                               args.candidate_seed, args.candidate_steps,
                                               on_image=lambda done, _total: bar.update(done - bar.n))
        for c in found:
            print(c.file)
        print(f"pick your favourites, then: python -m studio refine {parent.id} --images FILE [FILE ...]",
              file=sys.stderr)
        return 0
    recipe = {k: getattr(args, k) for k in ("steps", "grad_accum", "lr", "seed", "preview_every", "preview_steps",
                                            "checkpoint_every") if getattr(args, k) is not None}
    auto = None
    if args.auto:
        auto = {"candidates": args.candidates, "top_k": args.top_k, "seed": args.candidate_seed,
                "steps": args.candidate_steps, "style_metric": args.style_metric}
    # Everything is checked (images, names, the metric models for --auto) before a model loads.
    plan = refine.plan_refinement(store, args.template, images=args.images, captions=args.captions, auto=auto,
                                  name=args.name, recipe=recipe)
    spec = resolve(plan.parent.backbone or "tiny")

    from studio.engine.memory import plan_training
    from studio.engine.progress import TqdmObserver
    from studio.engine.training import prepare_run, train

    memory = plan_training(spec.backbone_id, plan.recipe)
    print(f"memory: {memory.describe()}", file=sys.stderr)
    print(f"loading backbone {spec.backbone_id} ...", file=sys.stderr)
    backbone = load_backbone(spec.backbone_id, precision=plan.recipe.precision, on_download=show_download,
                             **memory.load_kwargs())
    run_dir = Path(args.run_dir) if args.run_dir else new_run_dir("refine")
    print(f"run folder: {run_dir}", file=sys.stderr)
    if plan.request is not None:
        prepare_run(plan.request, run_dir, backbone.backbone_id, backbone.family, backbone.default_resolution)
    elif not (run_dir / "request.json").exists():
        from studio.styles.metrics import StyleScorer

        refine.write_plan(run_dir, plan.plan)
        lineage = refine.prepare_automatic(backbone, run_dir, store, StyleScorer(download=False),
                                           say=lambda message: print(message, file=sys.stderr))
        for entry in lineage["synthetic"]:
            print(f"CLIP picked {entry['source']} ({entry['prompt']}): style {entry['style']:.3f} x text "
                  f"{entry['text']:.3f} = {entry['score']:.4f}", file=sys.stderr)
    with TqdmObserver(plan.recipe.steps) as observer:
        result = train(backbone, run_dir, observer, micro_batch=memory.micro_batch)
    info = publish(store, result, plan.name)
    print(info.path)
    return 0


def cmd_templates(args: argparse.Namespace, store) -> int:
    if args.action == "list":
        for info in store.list(args.query):
            print(f"{info.id}\t{info.name}\t{info.style_prompt}\t{info.backbone}\t{info.created}")
    elif args.action == "export":
        from studio.checks import writable_dir

        out = writable_dir(args.out)
        if args.precision and args.format != "comfy":
            raise StudioError("--precision applies to --format comfy only")
        if args.format == "comfy":
            print(store.export_comfy(args.template, out, args.precision or "bf16"))
        else:
            export = {"zip": store.export_zip, "safetensors": store.export_safetensors}[args.format]
            print(export(args.template, out))
    elif args.action == "import":
        print(store.import_file(Path(args.file), args.name).path)
    elif args.action == "rename":
        print(store.rename(args.template, args.name).name)
    elif args.action == "delete":
        store.delete(args.template)
        print(f"deleted {args.template}")
    elif args.action == "search":
        return cmd_search(args, store)
    elif args.action == "scores":
        return cmd_scores(args, store)
    return 0


def cmd_jobs(args: argparse.Namespace, store) -> int:
    from dataclasses import replace

    from studio.jobs import run_actions
    from studio.jobs.jobs import Jobs
    from studio.jobs.queue import Settings

    settings = Settings.from_env()
    if args.store:
        settings = replace(settings, store_dir=Path(args.store).expanduser().resolve())
    jobs = Jobs(settings=settings)
    if args.action == "publish":
        status = jobs.publish_result(args.job)
        print(f"{status['template_id']}\t{status['message']}")
    elif args.action == "list":
        return _list_jobs(jobs, args)
    elif args.action in ("resume", "save"):
        status = (run_actions.resume if args.action == "resume" else run_actions.save_checkpoint)(jobs, args.job)
        print(f"{status['id']}\t{status['state']}\t{status['message']} (a running worker takes it: "
              "`python -m studio.worker`, or the app)")
    elif args.action == "retry":
        print(run_actions.retry(jobs, args.job))
    else:
        gone = run_actions.delete(jobs, args.job)
        print(f"deleted {gone['deleted']} ({gone['kind']} {gone['name']!r}, {gone['freed_bytes'] / 1e6:.1f} MB)")
    return 0


def _list_jobs(jobs, args: argparse.Namespace) -> int:
    import json

    from studio.checks import strict_int

    rows = jobs.list_jobs(args.kind, limit=strict_int(args.n, "-n", 1, 500), brief=True)
    keys = ("id", "kind", "state", "name", "step", "total_steps", "checkpoint_step", "duration_s", "started",
            "template_id", "error", "message")
    if args.json:
        print(json.dumps([{k: r.get(k) for k in keys} for r in rows], indent=1))
        return 0
    for r in rows:
        saved = f" saved@{r['checkpoint_step']}" if r.get("checkpoint_step") else ""
        steps = f"{r['step']}/{r['total_steps']}{saved}"
        note = (r.get("error") or r.get("message") or "").replace("\t", " ")
        print("\t".join([r["id"], r["state"], r.get("name") or "", steps, note]))
    return 0


def _index_progress():
    """A progress callback that shows a bar once there are images to embed (the first search of many)."""
    bar = None

    def update(done: int, total: int) -> None:
        nonlocal bar
        if bar is None:
            from tqdm import tqdm

            bar = tqdm(total=total, desc="indexing template images", unit="img", file=sys.stderr)
        bar.update(done - bar.n)
        if done >= total:
            bar.close()

    return update


def cmd_search(args: argparse.Namespace, store) -> int:
    import json

    from studio.styles.retrieval import StyleIndex

    if not args.image and not (args.query or "").strip():
        raise StudioError("give words to search for, or --image PATH")
    index = StyleIndex(store)
    if args.image:
        from studio.media.images import load_reference_images

        load_reference_images(args.image)  # a bad file fails before the models load
        if args.query:
            print("note: searching by --image; the words are ignored", file=sys.stderr)
    if index.available()[0]:
        index.sync(_index_progress())  # the first search of many new templates shows a progress bar
    if args.image:
        result = index.search_images(args.image, args.k, args.min_similarity)
    else:
        result = index.search_text(args.query, args.k)
    rows = [{"id": h.template.id, "name": h.template.name, "style_prompt": h.template.style_prompt,
             "similarity": None if h.similarity is None else round(h.similarity, 4), "matched": h.matched}
            for h in result.hits]
    if args.json:
        print(json.dumps({"results": rows, "mode": result.mode, "note": result.note}, indent=2, ensure_ascii=False))
    else:
        print(f"note: {result.note}", file=sys.stderr)
        for r in rows:
            sim = "-" if r["similarity"] is None else f"{r['similarity']:.3f}"
            print(f"{sim}\t{r['id']}\t{r['name']}\t{r['style_prompt']}\t{r['matched']}")
    return 0


def cmd_scores(args: argparse.Namespace, store) -> int:
    import json

    from studio.styles.retrieval import template_scores

    scores = template_scores(store, args.template)
    if not scores["available"]:
        raise StudioError(f"scores unavailable: {scores['reason']}")
    if args.json:
        print(json.dumps(scores, indent=2, ensure_ascii=False))
        return 0
    for key, label in (("dino", "style (DINO)"), ("clip_i", "style (CLIP-I)"), ("clip_t", "prompt (CLIP-T)"),
                       ("clip_t_full", "prompt with style words (CLIP-T)")):
        if scores.get(key) is not None:
            print(f"{key}\t{scores[key]:.4f}\t{label}")
    print(f"on {scores['n_images']} preview(s) of step {scores['step']}", file=sys.stderr)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        from studio.store.templates import TemplateStore

        store = TemplateStore(Path(args.store) if args.store else config.store_dir())
        command = {"train": cmd_train, "generate": cmd_generate, "templates": cmd_templates,
                   "refine": cmd_refine, "jobs": cmd_jobs}[args.command]
        return command(args, store)
    except StudioError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return EXIT_INPUT
    except OSError as exc:
        if exc.filename is None or os.environ.get("STUDIO_DEBUG"):
            return _internal(exc)
        # A path the machine refuses (no such folder, read-only, disk full): one line, like every bad path.
        where = os.fsdecode(exc.filename) if isinstance(exc.filename, str | bytes) else str(exc.filename)
        print(f"error: cannot use {where!r}: {exc.strerror or exc}", file=sys.stderr)
        return EXIT_INPUT
    except KeyboardInterrupt:
        print("interrupted; run the same command with --run-dir to resume a training", file=sys.stderr)
        return EXIT_INTERRUPTED
    except Exception as exc:  # a bug or the machine (out of memory...): one line, details on demand
        return _internal(exc)


def _internal(exc: Exception) -> int:
    """Report an unexpected error in one line (re-raised with ``STUDIO_DEBUG=1``); out of memory is the user's."""
    import torch

    if isinstance(exc, torch.OutOfMemoryError):
        print("error: out of GPU memory; try a lower --resolution or --rank", file=sys.stderr)
        return EXIT_INPUT
    if os.environ.get("STUDIO_DEBUG"):
        raise exc
    print(f"internal error: {type(exc).__name__}: {exc} (set STUDIO_DEBUG=1 for details)", file=sys.stderr)
    return EXIT_INTERNAL


if __name__ == "__main__":
    sys.exit(main())
