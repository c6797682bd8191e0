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

This module holds the definitions (tokenizers, configs, the constructed VAE), the builders and the
versioned cache (`ensure_tiny_flux`, `ensure_tiny_sd3`); the pre-training (scenes, captions, the
training loop) is in `studio.engine.backbones.tiny_pretrain`.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
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

    `pretrain_steps` defaults to `tiny_pretrain.PRETRAIN_STEPS` (0: the random transformer). The result is
    byte-identical from build to build: fixed seeds, one CPU thread, the caller's RNG untouched.
    """
    import torch

    from studio.engine.backbones.tiny_pretrain import PRETRAIN_STEPS, pretrain_flux

    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # deterministic reductions; the tiny kernels gain nothing from threads
    try:
        with torch.random.fork_rng(devices=[]):  # leave the caller's RNG state alone
            pipe = _tiny_flux_pipeline()
            steps = PRETRAIN_STEPS if pretrain_steps is None else pretrain_steps
            if steps:
                pretrain_flux(pipe, steps, _SEED + 4, log)
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
