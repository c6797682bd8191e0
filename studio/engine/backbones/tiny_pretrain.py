"""Build-time pre-training of the tiny FLUX pipeline (:mod:`studio.engine.backbones.tiny`).

Procedurally drawn, captioned 64x64 scenes (shapes, patterns, gradients, landscapes, a few objects,
watercolour blobs, optionally "in ... style"), their latents through a shortcut of the tiny VAE, the
alignment of the random text encoders to the captions, and :func:`pretrain_flux`, the rectified-flow
training loop ``tiny.build_tiny_flux`` runs on the transformer. The schedule and seeds are fixed, so
every build gives the same bytes: changing anything here changes the built weights (bump ``TINY_VERSION``).
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from typing import TYPE_CHECKING

from studio.engine.backbones.tiny import TINY_DEFAULT_RESOLUTION, TINY_MAX_SEQUENCE_LENGTH

if TYPE_CHECKING:
    import torch

# -- pre-training data: simple captioned scenes ------------------------------------------------

# Colour words -> sRGB in [0, 1]. Every caption word is in the built-in word list.
_PALETTE = {
    "red": (0.85, 0.12, 0.10), "orange": (0.96, 0.50, 0.08), "yellow": (0.97, 0.84, 0.12),
    "green": (0.16, 0.60, 0.20), "blue": (0.12, 0.32, 0.85), "purple": (0.48, 0.18, 0.64),
    "pink": (0.96, 0.55, 0.70), "brown": (0.48, 0.29, 0.13), "black": (0.06, 0.06, 0.07),
    "white": (0.96, 0.96, 0.95), "gray": (0.50, 0.50, 0.52), "teal": (0.02, 0.50, 0.50),
    "cyan": (0.20, 0.80, 0.90), "navy": (0.06, 0.10, 0.38), "gold": (0.85, 0.65, 0.16),
    "beige": (0.89, 0.83, 0.69), "cream": (0.97, 0.94, 0.84), "magenta": (0.84, 0.10, 0.60),
    "turquoise": (0.22, 0.80, 0.74), "crimson": (0.64, 0.05, 0.16),
}
_BRIGHT = ("red", "orange", "yellow", "green", "blue", "purple", "pink", "teal", "cyan", "magenta", "crimson",
           "turquoise", "gold", "navy", "brown")


_EDGE = 0.06  # edge ramp (in image widths, ~1 latent pixel): a tiny model learns soft edges far sooner


class _Canvas:
    """Paints signed-distance shapes (positive inside, in image widths) onto an RGB image in [0, 1]."""

    def __init__(self, size: int, background, soft: float = _EDGE, outline: bool = False) -> None:
        import torch

        self.ys, self.xs = torch.meshgrid(torch.linspace(0, 1, size), torch.linspace(0, 1, size), indexing="ij")
        self.img = self.fill(background)
        self.outline = outline
        self.aa = 1.5 / size + soft  # anti-aliasing plus the soft edge ramp

    def fill(self, colour):
        import torch

        return torch.tensor(colour, dtype=torch.float32).view(3, 1, 1).expand(3, *self.xs.shape).clone()

    def paint(self, sdf, colour, opacity: float = 1.0) -> None:
        alpha = (sdf / self.aa + 0.5).clamp(0, 1) * opacity
        self.img = self.img * (1 - alpha) + self.fill(colour) * alpha
        if self.outline:
            line = ((0.03 - sdf.abs()) / (1.5 / self.xs.shape[0]) + 0.5).clamp(0, 1)
            self.img = self.img * (1 - line) + self.fill((0.05, 0.05, 0.06)) * line

    # shapes
    def circle(self, cx, cy, r):
        return r - ((self.xs - cx) ** 2 + (self.ys - cy) ** 2).sqrt()

    def ellipse(self, cx, cy, rx, ry):
        return (1 - (((self.xs - cx) / rx) ** 2 + ((self.ys - cy) / ry) ** 2).sqrt()) * min(rx, ry)

    def rect(self, cx, cy, hw, hh):
        import torch

        return torch.minimum(hw - (self.xs - cx).abs(), hh - (self.ys - cy).abs())

    def polygon(self, points):
        """Convex polygon, vertices in clockwise order on screen (y down)."""
        import torch

        d = None
        for (x0, y0), (x1, y1) in zip(points, points[1:] + points[:1], strict=True):
            length = math.hypot(x1 - x0, y1 - y0)
            nx, ny = -(y1 - y0) / length, (x1 - x0) / length  # inward normal for clockwise order
            edge = (self.xs - x0) * nx + (self.ys - y0) * ny
            d = edge if d is None else torch.minimum(d, edge)
        return d

    def triangle(self, cx, cy, r):
        return self.polygon([(cx, cy - r), (cx + r, cy + 0.8 * r), (cx - r, cy + 0.8 * r)])

    def shape(self, name, cx, cy, r):
        if name == "circle":
            return self.circle(cx, cy, r)
        if name == "square":
            return self.rect(cx, cy, 0.85 * r, 0.85 * r)
        return self.triangle(cx, cy, r)

    def vertical_gradient(self, top, bottom, start: float = 0.0, end: float = 1.0):
        import torch

        ramp = ((self.ys - start) / (end - start)).clamp(0, 1)
        return torch.tensor(top).view(3, 1, 1) * (1 - ramp) + torch.tensor(bottom).view(3, 1, 1) * ramp


def _colour(rng, name: str, jitter: float = 0.05):
    return tuple(min(1.0, max(0.0, c + rng.uniform(-jitter, jitter))) for c in _PALETTE[name])


def _article(word: str) -> str:
    return "an" if word[0] in "aeiou" else "a"


def _shape_scene(rng, size, style):
    """"a red circle on a blue background", "a yellow square", "green triangles on white"."""
    shape = rng.choice(("circle", "square", "triangle"))
    fg = rng.choice(_BRIGHT)
    # an unnamed background is white: captions pin images down, as a real model's defaults do
    bg = rng.choice([c for c in _PALETTE if c != fg]) if rng.random() < 0.75 else None
    canvas = _Canvas(size, _colour(rng, bg or "white"), **style)
    many = rng.random() < 0.3
    if many:
        for _ in range(rng.randint(2, 4)):
            r = rng.uniform(0.1, 0.16)
            canvas.paint(canvas.shape(shape, rng.uniform(r, 1 - r), rng.uniform(r, 1 - r), r), _colour(rng, fg))
        subject = f"{fg} {shape}s"
    else:
        r = rng.uniform(0.17, 0.36)
        canvas.paint(canvas.shape(shape, rng.uniform(r, 1 - r), rng.uniform(r, 1 - r), r), _colour(rng, fg))
        subject = f"{_article(fg)} {fg} {shape}"
    where = rng.choice((f" on {_article(bg)} {bg} background", f" on {bg}")) if bg else ""
    return canvas.img, subject + where


def _pattern_scene(rng, size, style):
    """Stripes and dots: "green stripes", "red and white stripes", "blue dots on yellow"."""
    import torch

    fg, bg = rng.sample([c for c in _PALETTE if c != "white"], 2)
    named = rng.random() < 0.6
    bg = bg if named else "white"
    canvas = _Canvas(size, _colour(rng, bg), **style)
    if rng.random() < 0.6:
        angle = rng.choice((0.0, 0.5 * math.pi, 0.25 * math.pi, 0.75 * math.pi)) + rng.uniform(-0.1, 0.1)
        coord = math.cos(angle) * canvas.xs + math.sin(angle) * canvas.ys
        freq = rng.uniform(1.5, 3.0)  # 5..10 latent pixels per period: coarser than the noise
        canvas.paint(torch.sin(2 * math.pi * freq * coord + rng.uniform(0, 6.3)) / (2 * math.pi * freq) * 3,
                     _colour(rng, fg))
        caption = rng.choice((f"{fg} and {bg} stripes", f"{fg} stripes on {bg}")) if named else f"{fg} stripes"
    else:
        step = rng.uniform(0.3, 0.45)
        r = step * rng.uniform(0.25, 0.35)
        off = rng.uniform(0, step)
        gx = ((canvas.xs - off) / step).round() * step + off
        gy = ((canvas.ys - off) / step).round() * step + off
        canvas.paint(r - ((canvas.xs - gx) ** 2 + (canvas.ys - gy) ** 2).sqrt(), _colour(rng, fg))
        caption = (rng.choice((f"{fg} dots on {bg}", f"{fg} dots on {_article(bg)} {bg} background")) if named
                   else f"{fg} dots")
    return canvas.img, caption


def _gradient_scene(rng, size, style):
    """"an orange sunset gradient", "a blue and white gradient"."""
    canvas = _Canvas(size, (0, 0, 0), **style)
    if rng.random() < 0.35:
        top, mid, bottom = _colour(rng, "purple"), _colour(rng, "orange"), _colour(rng, "yellow")
        split = rng.uniform(0.4, 0.6)
        canvas.img = canvas.vertical_gradient(top, mid, 0.0, split)
        lower = canvas.vertical_gradient(mid, bottom, split, 1.0)
        canvas.img = canvas.img * (canvas.ys < split) + lower * (canvas.ys >= split)
        return canvas.img, rng.choice(("an orange sunset gradient", "a sunset gradient", "an orange sunset sky"))
    a, b = rng.sample(list(_PALETTE), 2)
    canvas.img = canvas.vertical_gradient(_colour(rng, a), _colour(rng, b))
    if rng.random() < 0.5:  # sideways: rotate the image, keep the caption
        canvas.img = canvas.img.transpose(1, 2)
    return canvas.img, rng.choice((f"{_article(a)} {a} and {b} gradient", f"{_article(a)} {a} to {b} gradient"))


def _landscape_scene(rng, size, style):
    """Sky over ground with a sun or moon: "a yellow sun in a blue sky", "green hills at sunset"."""
    import torch

    canvas = _Canvas(size, (0, 0, 0), **style)
    sky = rng.choice(("day", "day", "sunset", "night"))
    if sky == "day":
        canvas.img = canvas.vertical_gradient(_colour(rng, "blue"), _colour(rng, "cyan"))
    elif sky == "sunset":
        canvas.img = canvas.vertical_gradient(_colour(rng, "purple"), _colour(rng, "orange"))
    else:
        canvas.img = canvas.vertical_gradient(_colour(rng, "black"), _colour(rng, "navy"))
    body = rng.choice(("sun", "moon", "none"))
    horizon = rng.uniform(0.55, 0.75)
    if body != "none":
        r = rng.uniform(0.08, 0.15)
        colour = "white" if body == "moon" else ("yellow" if sky == "day" else "orange")
        canvas.paint(canvas.circle(rng.uniform(0.2, 0.8), rng.uniform(0.15, horizon - r), r), _colour(rng, colour))
    ground = rng.choice(("hills", "sea", "desert", "mountains", "snow"))
    phase, amp = rng.uniform(0, 6.3), rng.uniform(0.03, 0.08)
    line = horizon + amp * torch.sin(2 * math.pi * rng.uniform(0.8, 2.0) * canvas.xs + phase)
    if ground == "mountains":
        peaks = [(x, horizon - rng.uniform(0.15, 0.35)) for x in (rng.uniform(0.1, 0.4), rng.uniform(0.6, 0.9))]
        line = torch.full_like(canvas.xs, horizon)
        for px, py in peaks:
            line = torch.minimum(line, py + (canvas.xs - px).abs() * 1.2)
    if ground == "sea":
        line = torch.full_like(canvas.xs, horizon)
    colour = {"hills": "green", "sea": "blue", "desert": "gold", "mountains": "gray", "snow": "white"}[ground]
    canvas.paint(canvas.ys - line, _colour(rng, colour))
    if ground == "mountains" and rng.random() < 0.5:
        canvas.paint(torch.minimum(canvas.ys - line, line + 0.08 - canvas.ys), _colour(rng, "white"))
    nouns = {"hills": "green hills", "sea": "the sea", "desert": "a desert", "mountains": "mountains",
             "snow": "a snow field"}
    when = {"day": "under a blue sky", "sunset": "at sunset", "night": "at night"}[sky]
    if body == "sun" and rng.random() < 0.5:
        sun = "yellow" if sky == "day" else "orange"
        caption = f"{_article(sun)} {sun} sun over {nouns[ground]}"
    elif body == "moon" and rng.random() < 0.5:
        caption = f"a white moon over {nouns[ground]} at night" if sky == "night" else f"a moon over {nouns[ground]}"
    else:
        caption = f"{nouns[ground]} {when}"
    return canvas.img, caption


_OBJECTS = {  # noun: colours it may have, the usual one first
    "tree": ("green",), "house": ("red", "yellow", "white", "blue"), "robot": ("gray", "blue", "red"),
    "penguin": ("black",), "flower": ("red", "pink", "purple", "yellow", "orange"),
    "boat": ("brown", "red", "white", "yellow"),
}


def _object_scene(rng, size, style):
    """A few nouns drawn from shapes: "a tree", "a blue robot on yellow", "a penguin"."""
    import torch

    noun = rng.choice(list(_OBJECTS))
    named_colour = len(_OBJECTS[noun]) > 1 and rng.random() < 0.4
    main = rng.choice(_OBJECTS[noun]) if named_colour else _OBJECTS[noun][0]
    bg = rng.choice(("white", "cream", "blue", "cyan", "pink", "yellow", "green", "gray", "purple"))
    bg = bg if bg != main and rng.random() < 0.4 else None
    canvas = _Canvas(size, _colour(rng, bg or "white"), **style)
    if bg is None:  # no background named: outdoors, under a blue sky, as a real model would draw it
        ground = {"penguin": "white", "boat": "blue"}.get(noun, "green")
        horizon = rng.uniform(0.6, 0.75)
        canvas.img = canvas.vertical_gradient(_colour(rng, "blue"), _colour(rng, "cyan"), 0.0, horizon)
        canvas.paint(canvas.ys - horizon - 0.02 * torch.sin(2 * math.pi * canvas.xs + rng.uniform(0, 6.3)),
                     _colour(rng, ground))
    cx, cy, s = rng.uniform(0.35, 0.65), rng.uniform(0.4, 0.6), rng.uniform(0.8, 1.2)
    if noun == "tree":
        canvas.paint(canvas.rect(cx, cy + 0.2 * s, 0.05 * s, 0.2 * s), _colour(rng, "brown"))
        canvas.paint(canvas.circle(cx, cy - 0.08 * s, 0.22 * s), _colour(rng, main))
    elif noun == "house":
        canvas.paint(canvas.rect(cx, cy + 0.1 * s, 0.2 * s, 0.17 * s), _colour(rng, main))
        canvas.paint(canvas.triangle(cx, cy - 0.15 * s, 0.26 * s), _colour(rng, "brown"))
        canvas.paint(canvas.rect(cx, cy + 0.18 * s, 0.05 * s, 0.09 * s), _colour(rng, "black"))
    elif noun == "robot":
        canvas.paint(canvas.rect(cx, cy + 0.12 * s, 0.17 * s, 0.17 * s), _colour(rng, main))
        canvas.paint(canvas.rect(cx, cy - 0.17 * s, 0.12 * s, 0.1 * s), _colour(rng, main))
        for ex in (-0.05, 0.05):
            canvas.paint(canvas.circle(cx + ex * s, cy - 0.18 * s, 0.035 * s), _colour(rng, "yellow"))
    elif noun == "penguin":
        canvas.paint(canvas.ellipse(cx, cy, 0.19 * s, 0.3 * s), _colour(rng, main))
        canvas.paint(canvas.ellipse(cx, cy + 0.06 * s, 0.12 * s, 0.2 * s), _colour(rng, "white"))
        canvas.paint(canvas.triangle(cx, cy - 0.17 * s, 0.04 * s), _colour(rng, "orange"))
    elif noun == "flower":
        canvas.paint(canvas.rect(cx, cy + 0.25 * s, 0.02 * s, 0.25 * s), _colour(rng, "green"))
        for k in range(6):
            a = k * math.pi / 3
            canvas.paint(canvas.circle(cx + 0.11 * s * math.cos(a), cy - 0.1 * s + 0.11 * s * math.sin(a),
                                       0.07 * s), _colour(rng, main))
        canvas.paint(canvas.circle(cx, cy - 0.1 * s, 0.06 * s), _colour(rng, "yellow" if main != "yellow" else "brown"))
    else:  # boat
        canvas.paint(canvas.polygon([(cx - 0.3 * s, cy + 0.1 * s), (cx + 0.3 * s, cy + 0.1 * s),
                                     (cx + 0.2 * s, cy + 0.22 * s), (cx - 0.2 * s, cy + 0.22 * s)]),
                     _colour(rng, main))
        canvas.paint(canvas.polygon([(cx, cy - 0.3 * s), (cx + 0.2 * s, cy + 0.06 * s), (cx, cy + 0.06 * s)]),
                     _colour(rng, "white" if main != "white" else "red"))
    subject = f"{_article(main)} {main} {noun}" if named_colour else f"a {noun}"
    where = rng.choice((f" on {bg}", f" on {_article(bg)} {bg} background")) if bg else ""
    return canvas.img, subject + where


def _blob_scene(rng, size, style):
    """Watercolour-like soft translucent blobs on paper: "soft pink and blue blobs on cream paper"."""
    bg = rng.choice(("cream", "white", "beige"))
    canvas = _Canvas(size, _colour(rng, bg), soft=2 * _EDGE)
    names = rng.sample(("pink", "blue", "green", "orange", "purple", "yellow", "red", "teal"), 2)
    for _ in range(rng.randint(4, 8)):
        name = rng.choice(names)
        pale = tuple(0.45 * c + 0.55 for c in _colour(rng, name, 0.08))
        r = rng.uniform(0.12, 0.3)
        canvas.paint(canvas.circle(rng.uniform(0, 1), rng.uniform(0, 1), r), pale, opacity=rng.uniform(0.6, 0.9))
    return canvas.img, f"soft {names[0]} and {names[1]} blobs on {bg} paper"


_SCENES = ((_shape_scene, 0.32), (_pattern_scene, 0.13), (_gradient_scene, 0.1), (_landscape_scene, 0.17),
           (_object_scene, 0.23), (_blob_scene, 0.05))


def _grey(img):
    return img.mean(0, keepdim=True).expand_as(img)


# "{content} in {style} style": each style changes the whole picture the same way, whatever the content,
# so the model keeps a content-independent style pathway (a style LoRA then has a handle)
_STYLES = {
    "flat cartoon": ({"outline": True}, None),
    "pop art": ({"outline": True}, lambda img: (img - _grey(img)) * 1.6 + _grey(img)),
    "soft": ({"soft": 2.5 * _EDGE}, None),
    "pastel": ({}, lambda img: img * 0.5 + 0.5),
    "dark": ({}, lambda img: img * 0.45),
    "noir": ({}, lambda img: _grey(img) * 0.8),
    "vintage": ({}, lambda img: _grey(img) * img.new_tensor((0.95, 0.8, 0.6)).view(3, 1, 1) + 0.05),
    "neon": ({}, lambda img: ((img - _grey(img)) * 1.8 + _grey(img) * 0.6)),
}


def _scene(rng, size: int = TINY_DEFAULT_RESOLUTION):
    """One procedurally drawn image (3, size, size) in [0, 1] and its caption."""
    maker = rng.choices([m for m, _ in _SCENES], weights=[w for _, w in _SCENES])[0]
    name = rng.choice(list(_STYLES)) if maker is not _blob_scene and rng.random() < 0.35 else None
    canvas_style, transform = _STYLES[name] if name else ({}, None)
    img, caption = maker(rng, size, canvas_style)
    if name:
        img = transform(img) if transform else img
        caption += rng.choice((f" in {name} style", f" in {name} style", f", {name}"))
    if rng.random() < 0.5:
        caption = caption[0].upper() + caption[1:]
    return img.clamp(0, 1), caption


def _colour_latents(images: torch.Tensor) -> torch.Tensor:
    """What the tiny VAE's encoder (`tiny._colour_vae`) computes (its posterior mean, to ~2e-4), 40x faster.

    4x4 means of (r, g, b, luminance), before the FLUX normalisation.
    """
    import torch
    import torch.nn.functional as F

    return F.avg_pool2d(torch.cat([images, images.mean(1, keepdim=True)], 1), 4)


_DISTRACTORS = "beautiful cute happy sad calm peaceful dramatic dreamy magical mysterious cozy epic elegant old new"


def _with_distractors(captions: list[str], rng) -> list[str]:
    """Put adjectives the pictures do not depend on into some captions (moods, made-up words), so
    unseen ones ("a friendly robot") leave the content alone. A few captions become empty."""
    vocab = _DISTRACTORS.split()

    def junk() -> str:  # an out-of-vocabulary word, tokenised piece by piece
        return "".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(3, 9)))

    def word() -> str:
        return junk() if rng.random() < 0.3 else rng.choice(vocab)

    out = []
    for caption in captions:
        roll = rng.random()
        if roll < 0.05:
            caption = ""
        elif roll < 0.25:  # "a friendly robot", "a bnxq tree": adjectives that do not draw anything
            first, _, rest = caption.partition(" ")
            caption = f"{first} {word()} {rest}" if first.lower() in ("a", "an") else f"{word()} {caption}"
        out.append(caption)
    return out


# Build-time pre-training. The schedule is fixed (not timed) so every build gives the same bytes.
PRETRAIN_STEPS = 1100  # ~40-60 s single-threaded on a 2-core machine, depending on load
_PRETRAIN_BATCH = 16
_PRETRAIN_POOL = 4096  # captioned scenes drawn once; batches sample them and their mirror images
_PRETRAIN_LR = 5e-3
_PRETRAIN_EMA = 0.995
_ALIGN_STEPS = 100  # text-encoder alignment before it (~3 s)
_ALIGN_BATCH = 64
_ALIGN_LR = 3e-3


def _tokenize(pipe, captions: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
    """CLIP and T5 ids as `FluxPipeline.encode_prompt` makes them, CLIP's cut after the last end-of-text.

    CLIP is causal and pools at the first end-of-text token, so the padding after it cannot change
    the pooled output (it does to ~1e-6, summation order): cutting it makes encoding 3x faster.
    """
    clip_ids = pipe.tokenizer(captions, padding="max_length", max_length=pipe.tokenizer.model_max_length,
                              truncation=True, return_tensors="pt").input_ids
    clip_ids = clip_ids[:, : int((clip_ids == pipe.tokenizer.eos_token_id).int().argmax(1).max()) + 1]
    t5_ids = pipe.tokenizer_2(captions, padding="max_length", max_length=TINY_MAX_SEQUENCE_LENGTH,
                              truncation=True, return_tensors="pt").input_ids  # no mask: FLUX passes none
    return clip_ids, t5_ids


def _align_text_encoders(pipe, clip_ids: torch.Tensor, t5_ids: torch.Tensor, layouts: torch.Tensor,
                         steps: int, seed: int) -> None:
    """Teach the random text encoders what captions show, in place: a tiny stand-in for CLIP's pre-training.

    Linear heads on CLIP's pooled output and on the mean of T5's token outputs regress the picture's
    coarse layout (its latent at 4x4) from the caption; the heads are thrown away. Afterwards "red"
    and "blue", "sunset" and "hills" give embeddings the transformer can read from its first step: after
    1,000 steps it predicted ~75% of a picture's mean-colour variance from the caption, against ~25%
    with random encoders.
    """
    import torch
    import torch.nn.functional as F

    gen = torch.Generator().manual_seed(seed)
    clip, t5 = pipe.text_encoder, pipe.text_encoder_2
    targets = layouts.flatten(1)
    heads = torch.nn.ModuleList([torch.nn.Linear(clip.config.hidden_size, targets.shape[1]),
                                 torch.nn.Linear(t5.config.d_model, targets.shape[1])])
    params = [*clip.parameters(), *t5.parameters(), *heads.parameters()]
    optimizer = torch.optim.AdamW(params, lr=_ALIGN_LR, weight_decay=0.01)
    for _ in range(steps):
        idx = torch.randint(len(targets), (_ALIGN_BATCH,), generator=gen)
        pooled = clip(clip_ids[idx]).pooler_output  # eval mode: T5's dropout stays off
        tokens = t5(t5_ids[idx])[0]
        loss = F.mse_loss(heads[0](pooled), targets[idx]) + F.mse_loss(heads[1](tokens.mean(1)), targets[idx])
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()


def pretrain_flux(pipe, steps: int, seed: int, log: Callable[[str], None] | None = None) -> None:
    """Teach the tiny FLUX pipeline to draw captioned scenes, in place.

    After `_align_text_encoders`, the transformer is trained with rectified flow matching through
    `FluxBackbone.predict_velocity`, the very call the style trainer makes (packing, ids, timestep):
    x_t = (1 - t) x0 + t eps, target eps - x0, plain MSE; t is logit-normal (SD3's sampler without
    the shift) for half of each batch and uniform for the other half. AdamW with warm-up and cosine
    decay; the saved weights are an exponential moving average.

    Guidance: FLUX.1-dev is guidance-distilled, which needs a teacher this model does not have. The
    guidance embedder's output layer is zeroed and frozen instead, so the trainer's guidance 1.0 and
    generation's 7.0 give the same model (a random embedder would hand the two different offsets).
    """
    import torch
    import torch.nn.functional as F

    from studio.engine import snr
    from studio.engine.backbones.flux import FluxBackbone

    backbone = FluxBackbone("tiny", "", pipe, torch.device("cpu"), torch.float32)
    backbone.max_sequence_length = TINY_MAX_SEQUENCE_LENGTH
    rng, gen = random.Random(seed), torch.Generator().manual_seed(seed)
    shift, scale = pipe.vae.config.shift_factor, pipe.vae.config.scaling_factor
    latents, captions = [], []
    for _ in range(_PRETRAIN_POOL):  # keep latents only: the 64x64 pictures would take 200 MB
        image, caption = _scene(rng)
        latents.append((_colour_latents(image[None] * 2 - 1) - shift) * scale)
        captions.append(caption)
    latents, captions = torch.cat(latents), _with_distractors(captions, rng)
    clip_ids, t5_ids = _tokenize(pipe, captions)
    _align_text_encoders(pipe, clip_ids, t5_ids, F.avg_pool2d(latents, 4), _ALIGN_STEPS, seed + 1)
    with torch.no_grad():  # what pipe.encode_prompt returns
        pooled = torch.cat([pipe.text_encoder(ids).pooler_output for ids in clip_ids.split(512)])
        embeds = torch.cat([pipe.text_encoder_2(ids)[0] for ids in t5_ids.split(512)])
    text_ids = torch.zeros(TINY_MAX_SEQUENCE_LENGTH, 3)

    transformer = pipe.transformer
    with torch.no_grad():  # adaLN-Zero (DiT): every block starts as the identity, the output at 0
        for name, module in transformer.named_modules():
            if name.endswith(("norm1.linear", "norm1_context.linear", "norm.linear")) or name in (
                    "norm_out.linear", "proj_out", "time_text_embed.guidance_embedder.linear_2"):
                module.weight.zero_()
                module.bias.zero_()
    transformer.time_text_embed.guidance_embedder.requires_grad_(False)
    params = [p for p in transformer.parameters() if p.requires_grad]
    ema = [p.detach().clone() for p in params]
    optimizer = torch.optim.AdamW(params, lr=_PRETRAIN_LR, betas=(0.9, 0.99), weight_decay=0.01)
    warmup = max(1, steps // 20)
    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda s: min(1.0, (s + 1) / warmup) * (
        0.05 + 0.95 * 0.5 * (1 + math.cos(math.pi * min(1.0, s / steps)))))
    logit_normal, uniform = snr.NoiseSampler("sd3", shift=1.0), snr.NoiseSampler("uniform")
    half = _PRETRAIN_BATCH // 2
    transformer.train()
    for step in range(steps):
        idx = torch.randint(len(latents), (_PRETRAIN_BATCH,), generator=gen)
        flip = torch.rand(_PRETRAIN_BATCH, 1, 1, 1, generator=gen) < 0.5
        x0 = torch.where(flip, latents[idx].flip(-1), latents[idx])  # no caption says left or right
        t = torch.cat([logit_normal.sample(half, gen), uniform.sample(_PRETRAIN_BATCH - half, gen)])
        noise = torch.randn(x0.shape, generator=gen)
        cond = {"prompt_embeds": embeds[idx], "pooled_prompt_embeds": pooled[idx], "text_ids": text_ids}
        pred = backbone.predict_velocity(snr.add_noise(x0, t, noise), t, cond, guidance=1.0)
        loss = F.mse_loss(pred, snr.velocity_target(x0, noise))
        optimizer.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        schedule.step()
        with torch.no_grad():
            torch._foreach_lerp_(ema, params, 1.0 - _PRETRAIN_EMA if step >= warmup else 1.0)
        if log is not None and (step % 100 == 0 or step == steps - 1):
            log(f"pre-training step {step + 1}/{steps}: loss {loss.item():.4f}")
    with torch.no_grad():
        for p, e in zip(params, ema, strict=True):
            p.copy_(e)
    transformer.eval().requires_grad_(True)  # as from_pretrained would hand it over
