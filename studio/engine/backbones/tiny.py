"""Tiny offline FLUX / SD3 pipelines with the real architectures, for CPU runs and tests.

`ensure_tiny_flux()` returns a folder that `FluxPipeline.from_pretrained` loads exactly like FLUX.1-dev
(same classes, same scheduler config), only ~2 MB big. Everything is built locally and
deterministically: tokenizers from a built-in word list, small text encoders and transformer, and a
VAE whose weights are *constructed* so that decode(encode(img)) reproduces colours and coarse layout
(a random VAE would decode to noise-coloured garbage and hide what training does).

The FLUX transformer is then pre-trained for about a minute at build time on procedurally drawn, captioned
64x64 scenes ("a red circle on a blue background", "green hills under a blue sky", "a robot in pop
art style"...), so the base model behaves like a text-to-image model in miniature: smooth pictures
that follow the prompt, which a style LoRA visibly changes. The SD3 pipeline stays random.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import shutil
import tempfile
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING

from studio import config

if TYPE_CHECKING:  # heavy imports stay lazy: the UI may import the backbone registry
    import torch
    from diffusers import AutoencoderKL
    from transformers import CLIPTokenizer, T5TokenizerFast

TINY_VERSION = 3  # bump whenever the built weights change: cached folders are keyed by it
TINY_DEFAULT_RESOLUTION = 64
TINY_MAX_SEQUENCE_LENGTH = 32  # T5 tokenizer model_max_length; pass it as the pipelines' max_sequence_length
MARKER = "tiny.json"
_CLIP_MAX_LENGTH = 77
_SEED = 20240521

_WORDS = """
a an the of in on at with and or by from to for into over under near above below behind beside through is are was be it
its this that his her their one two three four five many some few small big large tiny giant little old young new
ancient modern style art artwork painting painted paint drawing drawn sketch watercolor watercolour oil acrylic gouache
ink pencil charcoal pastel crayon marker chalk fresco mosaic photo photograph photography photorealistic realistic
illustration illustrated digital pixel vector render rendered 3d cgi anime manga cartoon comic poster print woodcut
linocut engraving etching lithograph ukiyo-e impressionist impressionism expressionist cubist cubism surreal surrealist
abstract minimalist minimal pop baroque renaissance gothic victorian vintage retro futuristic cyberpunk steampunk
fantasy sci-fi noir flat isometric low poly claymation origami stained glass embroidery colorful colourful vibrant
muted bright dark light soft hard bold pale deep warm cool glowing neon shiny matte glossy smooth rough textured grainy
blurry sharp detailed highly intricate simple clean red orange yellow green blue purple violet pink brown black white
gray grey gold golden silver teal cyan magenta beige cream navy crimson emerald turquoise rainbow color colour colors
palette tone panda cat cats dog dogs kitten puppy fox wolf bear bird birds owl eagle duck horse cow pig sheep rabbit
mouse lion tiger elephant giraffe monkey fish whale dolphin shark turtle frog snake dragon unicorn butterfly bee spider
deer squirrel raccoon penguin koala otter man woman boy girl child children person people king queen knight wizard
witch robot astronaut princess soldier chef doctor farmer sailor pirate ninja samurai warrior portrait face eyes hair
hands eating drinking sitting standing running walking flying swimming sleeping reading writing playing dancing singing
holding wearing riding looking smiling jumping climbing cooking fishing painting bamboo tree trees forest flower
flowers rose roses leaf leaves grass garden field meadow mountain mountains hill river lake sea ocean beach wave waves
island desert snow ice rain cloud clouds sky sun sunset sunrise moon star stars night day morning evening storm fog
mist fire water stone rock sand city town village street road bridge house castle tower church temple building
buildings room kitchen window door table chair bed lamp book books cup tea coffee cake bread apple fruit bowl vase car
train boat ship plane bicycle guitar piano hat dress coat umbrella clock mirror candle spring summer autumn fall winter
landscape cityscape seascape still life scene background foreground view close up wide shot top side front lighting
light shadow shadows sunlight moonlight reflection texture pattern stripes dots lines shapes circles squares geometric
organic brush strokes canvas paper wood wooden metal glass cloth fabric velvet silk plastic ceramic porcelain marble
beautiful cute happy sad calm peaceful dramatic dreamy magical mysterious cozy epic elegant whimsical japanese chinese
french italian dutch greek egyptian indian african nordic medieval high quality masterpiece best resolution hd 4k 8k
circle square triangle triangles gradient blob blobs outline outlines outlined hills
"""
_PUNCTUATION = list(".,;:!?'\"-()[]&/+*#%@=_<>|~$^`{}\\")


def _word_list() -> list[str]:
    """Built-in words + letters + digits + punctuation, in a fixed order (the vocabularies depend on it)."""
    singles = [chr(c) for c in range(ord("a"), ord("z") + 1)] + [str(d) for d in range(10)] + _PUNCTUATION
    return list(dict.fromkeys(_WORDS.split() + singles))


def _bpe_merges(words: list[str]) -> list[tuple[str, str]]:
    """Greedy BPE (most frequent pair, ties by the pair itself) until every word is one token.

    Hand-rolled because the `tokenizers` BpeTrainer breaks ties in hash order: not reproducible.
    """
    seqs = [s for s in (tuple(w[:-1]) + (w[-1] + "</w>",) for w in words) if len(s) > 1]
    merges: list[tuple[str, str]] = []
    while seqs:
        counts = Counter(p for s in seqs for p in zip(s, s[1:], strict=False))
        a, b = min(counts, key=lambda p: (-counts[p], p))
        merges.append((a, b))
        merged = []
        for s in seqs:
            out: list[str] = []
            for tok in s:
                if out and out[-1] == a and tok == b:
                    out[-1] = a + b
                else:
                    out.append(tok)
            if len(out) > 1:
                merged.append(tuple(out))
        seqs = merged
    return merges


def build_clip_tokenizer() -> CLIPTokenizer:
    """A CLIP BPE tokenizer whose vocabulary holds every built-in word as one token."""
    from transformers import CLIPTokenizer

    merges = _bpe_merges(_word_list())
    chars = [chr(c) for c in range(33, 127)]  # printable ASCII maps to itself in CLIP's byte-level alphabet
    tokens = chars + [c + "</w>" for c in chars] + [a + b for a, b in merges]
    tokens += ["<|startoftext|>", "<|endoftext|>"]  # at the end, as in the real CLIP vocab
    vocab = {t: i for i, t in enumerate(dict.fromkeys(tokens))}
    # without model_max_length, truncation overflows ("int too big to convert")
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=_CLIP_MAX_LENGTH)


def build_t5_tokenizer() -> T5TokenizerFast:
    """A T5 Unigram tokenizer (Metaspace pre-tokenizer): whole words score better than any split."""
    from transformers import T5TokenizerFast

    words = _word_list()
    pieces = [("<pad>", 0.0), ("</s>", 0.0), ("<unk>", 0.0), ("▁", -8.0)]  # T5's ids: pad 0, eos 1, unk 2
    # T5 is case-sensitive and T5TokenizerFast rebuilds its normalizer on reload (a Lowercase one would
    # be lost), so capitalised words get their own pieces
    cased = dict.fromkeys(w2 for w in words for w2 in (w, w.capitalize()))
    pieces += [("▁" + w, -5.0) for w in cased]
    pieces += [(c, -10.0) for c in dict.fromkeys(c for w in cased for c in w)]  # continuation characters
    # T5TokenizerFast builds the `tokenizers` Unigram model + Metaspace itself (a WordLevel model would
    # save but not reload under transformers 5); no sentinel <extra_id_*> tokens needed here.
    return T5TokenizerFast(vocab=pieces, extra_ids=0, model_max_length=TINY_MAX_SEQUENCE_LENGTH)


def _clip_encoder(tokenizer: CLIPTokenizer, hidden: int, with_projection: bool, seed: int) -> torch.nn.Module:
    import torch
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    config = CLIPTextConfig(
        vocab_size=len(tokenizer), hidden_size=hidden, intermediate_size=2 * hidden, projection_dim=hidden,
        num_hidden_layers=2, num_attention_heads=2, max_position_embeddings=_CLIP_MAX_LENGTH,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id,
    )
    torch.manual_seed(seed)
    return (CLIPTextModelWithProjection if with_projection else CLIPTextModel)(config).eval()


def _t5_encoder(tokenizer: T5TokenizerFast, d_model: int, seed: int) -> torch.nn.Module:
    import torch
    from transformers import T5Config, T5EncoderModel

    config = T5Config(
        vocab_size=len(tokenizer), d_model=d_model, d_kv=16, d_ff=2 * d_model, num_layers=2, num_heads=2,
        feed_forward_proj="gated-gelu", pad_token_id=0, eos_token_id=1, decoder_start_token_id=0,
    )  # gated-gelu: T5 v1.1, the variant FLUX and SD3 use
    torch.manual_seed(seed)
    return T5EncoderModel(config).eval()


def _procedural_images(n: int, size: int, seed: int) -> torch.Tensor:
    """Flat colours, linear gradients, discs and stripes in [-1, 1], shape (n, 3, size, size)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    ys, xs = torch.meshgrid(torch.linspace(0, 1, size), torch.linspace(0, 1, size), indexing="ij")
    out = torch.empty(n, 3, size, size)
    for i in range(n):
        c0, c1 = torch.rand(2, 3, 1, 1, generator=g)
        angle = float(torch.rand(1, generator=g)) * 2 * math.pi
        ramp = math.cos(angle) * xs + math.sin(angle) * ys
        ramp = (ramp - ramp.min()) / (ramp.max() - ramp.min())
        if i % 4 == 0:
            t = torch.zeros_like(xs)
        elif i % 4 == 1:
            t = ramp
        elif i % 4 == 2:
            cx, cy, r = torch.rand(3, generator=g).tolist()
            t = (((xs - cx) ** 2 + (ys - cy) ** 2) < (0.1 + 0.3 * r) ** 2).float()
        else:
            t = (torch.sin(ramp * (2 + 6 * float(torch.rand(1, generator=g))) * math.pi) > 0).float()
        out[i] = c0 * (1 - t) + c1 * t
    return out * 2 - 1


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
    """What `_colour_vae`'s encoder computes (its posterior mean, to ~2e-4), 40x faster.

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
_PRETRAIN_STEPS = 1100  # ~40-60 s single-threaded on a 2-core machine, depending on load
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


def _pretrain_flux(pipe, steps: int, seed: int, log: Callable[[str], None] | None = None) -> None:
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


def _colour_vae(seed: int) -> AutoencoderKL:
    """An AutoencoderKL (scale factor 4, 4 latent channels) whose latent is the 4x4-average colour.

    A gradient fit of a randomly initialised GroupNorm VAE does not learn flat colours within a
    ~20 s budget, and Adam fine-tuning from this construction only made it worse, so the weights are
    set in closed form: residual branches zeroed (blocks become identities), stride-2 convs as 2x2
    means, up-sampling convs as copies. The GroupNorms before each conv_out see the channels
    (v, -v, K, -K): their mean is exactly 0 and their std ~constant (K dominates), and because
    silu(x) - silu(-x) == x, conv_out undoes norm + SiLU exactly. Latent = (r, g, b, luminance).
    """
    import torch
    from diffusers import AutoencoderKL
    from diffusers.models.attention_processor import Attention
    from diffusers.models.resnet import ResnetBlock2D

    width, k = 16, 100.0
    torch.manual_seed(seed)
    vae = AutoencoderKL(
        down_block_types=("DownEncoderBlock2D",) * 3, up_block_types=("UpDecoderBlock2D",) * 3,
        block_out_channels=(width,) * 3, layers_per_block=1, latent_channels=4, norm_num_groups=1,
        sample_size=TINY_DEFAULT_RESOLUTION, use_quant_conv=False, use_post_quant_conv=False,  # as FLUX's VAE
    )
    sigma = k * math.sqrt(2 / width)  # GroupNorm std of (v, -v, K, -K, zeros) when |v| << K
    eye, enc_mix = torch.eye(width), torch.tensor([[1.0, 0, 0], [0, 1, 0], [0, 0, 1], [1 / 3, 1 / 3, 1 / 3]])
    downs = [d.conv for block in vae.encoder.down_blocks for d in block.downsamplers or []]
    ups = [u.conv for block in vae.decoder.up_blocks for u in block.upsamplers or []]
    residual_outs = [m.conv2 for m in vae.modules() if isinstance(m, ResnetBlock2D)]
    residual_outs += [m.to_out[0] for m in vae.modules() if isinstance(m, Attention)]
    ends = [vae.encoder.conv_in, vae.encoder.conv_out, vae.decoder.conv_in, vae.decoder.conv_out]
    with torch.no_grad():
        for layer in residual_outs + downs + ups + ends:
            layer.weight.zero_()
            layer.bias.zero_()
        for conv in downs:  # input padded (0,1,0,1), 3x3 stride 2: taps [0:2, 0:2] give the 2x2 mean
            conv.weight[:, :, :2, :2] = eye[:, :, None, None] / 4
        for conv in ups:  # nearest x2 then 3x3 conv: the centre tap alone copies
            conv.weight[:, :, 1, 1] = eye
        for conv_in, mix in ((vae.encoder.conv_in, enc_mix), (vae.decoder.conv_in, torch.eye(4)[:3])):
            conv_in.weight[: len(mix), :, 1, 1], conv_in.weight[4 : 4 + len(mix), :, 1, 1] = mix, -mix
            conv_in.bias[8:10] = torch.tensor([k, -k])
        for conv_out, n in ((vae.encoder.conv_out, 4), (vae.decoder.conv_out, 3)):
            for c in range(n):
                conv_out.weight[c, c, 1, 1], conv_out.weight[c, c + 4, 1, 1] = sigma, -sigma
        vae.encoder.conv_out.bias[4:] = -8.0  # log-variance: posterior std ~0.02
        # FLUX-style latent normalisation: (latent - shift) * scale has mean 0, std 1 on typical images
        latents = vae.encode(_procedural_images(128, TINY_DEFAULT_RESOLUTION, seed)).latent_dist.mean
    vae.register_to_config(
        shift_factor=round(latents.mean().item(), 4), scaling_factor=round(1 / latents.std().item(), 4)
    )
    return vae.eval()


def _tiny_flux_pipeline():
    """The tiny `FluxPipeline` in memory, with random weights (the VAE's are constructed)."""
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler, FluxPipeline, FluxTransformer2DModel

    clip_tok, t5_tok = build_clip_tokenizer(), build_t5_tokenizer()
    vae = _colour_vae(_SEED)
    clip = _clip_encoder(clip_tok, hidden=64, with_projection=False, seed=_SEED + 1)
    t5 = _t5_encoder(t5_tok, d_model=64, seed=_SEED + 2)
    torch.manual_seed(_SEED + 3)
    transformer = FluxTransformer2DModel(
        patch_size=1, in_channels=4 * vae.config.latent_channels,  # the pipeline packs 2x2 latent patches
        num_layers=1, num_single_layers=1, attention_head_dim=32, num_attention_heads=2,  # ~9 ms fwd+bwd
        joint_attention_dim=t5.config.d_model, pooled_projection_dim=clip.config.hidden_size,
        # rope axes sum to the head dim; the 14-dim row / column axes get frequencies 1, 0.27, 0.07 ...
        # (an 8-dim axis has only 1 and 0.1): enough to tell the 8 token rows apart
        guidance_embeds=True, axes_dims_rope=(4, 14, 14),
    )
    scheduler = FlowMatchEulerDiscreteScheduler(  # FLUX.1-dev's scheduler_config.json
        num_train_timesteps=1000, shift=3.0, use_dynamic_shifting=True, base_shift=0.5, max_shift=1.15,
        base_image_seq_len=256, max_image_seq_len=4096,
    )
    return FluxPipeline(
        scheduler=scheduler, vae=vae, text_encoder=clip, tokenizer=clip_tok, text_encoder_2=t5,
        tokenizer_2=t5_tok, transformer=transformer.eval(),
    )


def build_tiny_flux(folder: Path, pretrain_steps: int | None = None,
                    log: Callable[[str], None] | None = None) -> Path:
    """Build the tiny `FluxPipeline`, pre-train its transformer, `save_pretrained` it to `folder`.

    `pretrain_steps` defaults to `_PRETRAIN_STEPS` (0: the random transformer). The result is
    byte-identical from build to build: fixed seeds, one CPU thread, the caller's RNG untouched.
    """
    import torch

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # deterministic reductions; the tiny kernels gain nothing from threads
    try:
        with torch.random.fork_rng(devices=[]):  # leave the caller's RNG state alone
            pipe = _tiny_flux_pipeline()
            steps = _PRETRAIN_STEPS if pretrain_steps is None else pretrain_steps
            if steps:
                _pretrain_flux(pipe, steps, _SEED + 4, log)
    finally:
        torch.set_num_threads(threads)
    pipe.save_pretrained(folder)
    return Path(folder)


def build_tiny_sd3(folder: Path) -> Path:
    """Write a tiny random-weight `StableDiffusion3Pipeline` (SD3.5-Large layout) to `folder`; returns it."""
    import torch
    from diffusers import FlowMatchEulerDiscreteScheduler, SD3Transformer2DModel, StableDiffusion3Pipeline

    clip_tok, t5_tok = build_clip_tokenizer(), build_t5_tokenizer()
    with torch.random.fork_rng(devices=[]):
        vae = _colour_vae(_SEED)
        clip_l = _clip_encoder(clip_tok, hidden=32, with_projection=True, seed=_SEED + 11)
        clip_g = _clip_encoder(clip_tok, hidden=32, with_projection=True, seed=_SEED + 12)
        t5 = _t5_encoder(t5_tok, d_model=64, seed=_SEED + 13)  # SD3 zero-pads the two CLIPs' 2x32 dims to T5's
        torch.manual_seed(_SEED + 14)
        transformer = SD3Transformer2DModel(
            sample_size=TINY_DEFAULT_RESOLUTION // 4, patch_size=2, in_channels=vae.config.latent_channels,
            out_channels=vae.config.latent_channels, num_layers=2,  # last block context_pre_only: no to_add_out
            attention_head_dim=16, num_attention_heads=2, joint_attention_dim=t5.config.d_model,
            caption_projection_dim=32, pooled_projection_dim=2 * 32, pos_embed_max_size=64, qk_norm="rms_norm",
        )
    pipe = StableDiffusion3Pipeline(
        scheduler=FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=3.0),
        vae=vae, text_encoder=clip_l, tokenizer=clip_tok, text_encoder_2=clip_g, tokenizer_2=clip_tok,
        text_encoder_3=t5, tokenizer_3=t5_tok, transformer=transformer.eval(),
    )
    pipe.save_pretrained(folder)
    return Path(folder)


def _is_valid(folder: Path, kind: str) -> bool:
    try:
        marker = json.loads((folder / MARKER).read_text())
    except (OSError, ValueError):
        return False
    return marker.get("version") == TINY_VERSION and marker.get("kind") == kind


def _ensure(kind: str, builder: Callable[[Path], Path], cache_dir: Path | None) -> Path:
    """Build once into a temp folder beside the target, then publish it with one atomic `os.rename`."""
    root = Path(cache_dir) if cache_dir is not None else config.cache_dir()
    final = root / f"tiny-{kind}-v{TINY_VERSION}"
    if _is_valid(final, kind):
        return final
    root.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".tmp-tiny-{kind}-", dir=root))
    os.chmod(tmp, 0o755)  # mkdtemp makes it private; the published folder should read like any other
    try:
        builder(tmp)
        (tmp / MARKER).write_text(json.dumps({"kind": kind, "version": TINY_VERSION}))  # last: marks it complete
        for _ in range(3):
            try:
                os.rename(tmp, final)
                return final
            except OSError:
                if _is_valid(final, kind):  # another process won the race: use theirs
                    return final
                # an invalid folder holds the name (never ours: we only publish complete ones); move it
                # aside atomically rather than deleting in place, then try again
                trash = Path(tempfile.mkdtemp(prefix=f".stale-tiny-{kind}-", dir=root))
                with contextlib.suppress(OSError):
                    os.rename(final, trash / "old")
                shutil.rmtree(trash, ignore_errors=True)
        raise OSError(f"could not publish {tmp} as {final}")
    finally:
        shutil.rmtree(tmp, ignore_errors=True)  # gone already when renamed


def ensure_tiny_flux(cache_dir: Path | None = None) -> Path:
    """Folder with the tiny FLUX pipeline (`FluxPipeline.from_pretrained(folder)`), built on first use.

    `cache_dir` defaults to `$STUDIO_CACHE` or `~/.cache/style-studio`. Generate at multiples of 8 px
    (`TINY_DEFAULT_RESOLUTION` by default) with `max_sequence_length <= TINY_MAX_SEQUENCE_LENGTH`.
    """
    return _ensure("flux", build_tiny_flux, cache_dir)


def ensure_tiny_sd3(cache_dir: Path | None = None) -> Path:
    """Folder with the tiny SD3 pipeline (`StableDiffusion3Pipeline.from_pretrained(folder)`), built on first use."""
    return _ensure("sd3", build_tiny_sd3, cache_dir)
