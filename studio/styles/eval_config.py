"""What an evaluation run is set up with: the paper's 23 prompts and three metrics, the named training
configurations (:data:`CONFIG_PRESETS`) and ``--config name:key=value`` parsing into :class:`EvalConfig`,
:class:`EvalSettings` (every setting a run depends on, checked), and the names of a unit's files that
the runner and the reports share.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from studio.engine.recipe import Recipe
from studio.errors import InputError
from studio.styles.style_sets import _SAFE_NAME

# The paper's 23 evaluation prompts (seed 000, appendix C.2; StyleDrop's list), in its order.
PAPER_PROMPTS: tuple[str, ...] = (
    "An Opera house in Sydney",
    "A fluffy baby sloth with a knitted hat trying to figure out a laptop, close up",
    "A Golden Gate bridge",
    "The letter 'G'",
    "A man riding a snowboard",
    "A panda eating bamboo",
    "A friendly robot",
    "A baby penguin",
    "A moose",
    "A towel",
    "An espresso machine",
    "An avocado",
    "A crown",
    "A banana",
    "A bench",
    "A boat",
    "A butterfly",
    "An F1 race car",
    "A Christmas tree",
    "A cow",
    "A hat",
    "A piano",
    "A wood cabin",
)

# Named configurations: Recipe fields over the paper's recipe (Recipe() defaults).
CONFIG_PRESETS: dict[str, dict[str, Any]] = {
    "sd3": {"sampler": "sd3"},  # the baseline: logit-normal t with shift 3
    "style_friendly": {"sampler": "style_friendly"},  # mu -6, sigma: the family default (FLUX 3, SD3.5 2)
    "sigma2": {"sampler": "style_friendly", "sigma": 2.0},
    "sigma3": {"sampler": "style_friendly", "sigma": 3.0},
    "offset0.01": {"sampler": "style_friendly", "offset_noise": 0.01},  # the paper's best FLUX result
    "sd3_offset0.1": {"sampler": "sd3", "offset_noise": 0.1},  # Table S3's offset-noise baseline
    "uniform": {"sampler": "uniform"},
}
DEFAULT_CONFIGS = ("sd3", "style_friendly")
METRICS = (("dino", "DINO"), ("clip_i", "CLIP-I"), ("clip_t", "CLIP-T (content)"))


@dataclass
class EvalConfig:
    """A named training configuration: Recipe fields over the paper's recipe."""

    name: str
    overrides: dict[str, Any]


def _parse_value(key: str, text: str) -> Any:
    """Parse ``text`` as the type of Recipe field ``key``."""
    kinds = {f.name: str(f.type) for f in fields(Recipe)}
    if key not in kinds:
        raise InputError(f"unknown recipe field {key!r}; choose from {', '.join(sorted(kinds))}")
    kind, text = kinds[key], text.strip()
    if text.lower() == "none" and "None" in kind:
        return None
    try:
        if kind.startswith("bool"):
            if text.lower() not in ("true", "false", "1", "0", "yes", "no"):
                raise ValueError(text)
            return text.lower() in ("true", "1", "yes")
        if kind.startswith("int"):
            return int(text)
        if kind.startswith("float"):
            return float(text)
    except ValueError:
        raise InputError(f"{key}={text!r}: expected {kind.split(' ')[0]}") from None
    return text


def parse_config(text: str) -> EvalConfig:
    """``name:key=value,key=value`` (or a preset's name) -> EvalConfig; InputError when malformed."""
    name, _, body = text.partition(":")
    name = name.strip()
    if not _SAFE_NAME.fullmatch(name):
        raise InputError(f"configuration name {name!r}: use letters, digits, '.', '_' or '-'")
    if not body.strip():
        if name not in CONFIG_PRESETS:
            raise InputError(f"unknown configuration {name!r}; presets: {', '.join(CONFIG_PRESETS)}, "
                             "or define one with --config name:key=value,...")
        return EvalConfig(name, dict(CONFIG_PRESETS[name]))
    overrides: dict[str, Any] = {}
    for item in body.split(","):
        key, eq, value = item.partition("=")
        if not eq:
            raise InputError(f"--config {text!r}: expected key=value, got {item!r}")
        overrides[key.strip()] = _parse_value(key.strip(), value)
    Recipe(**overrides).validate()
    return EvalConfig(name, overrides)


def resolve_configs(names: str | list[str] | None, custom: list[str] | None = None) -> list[EvalConfig]:
    """``--configs`` names (presets or names from ``--config``) plus every ``--config`` definition."""
    defined = {c.name: c for c in (parse_config(text) for text in custom or [])}
    if isinstance(names, str):
        names = [n.strip() for n in names.split(",") if n.strip()]
    ordered = list(dict.fromkeys([*(names or DEFAULT_CONFIGS), *defined]))
    return [defined.get(n) or parse_config(n) for n in ordered]


@dataclass
class EvalSettings:
    """Everything an evaluation run depends on (the CLI flags)."""

    styles_dir: Path
    out_dir: Path
    backbone: str = "tiny"
    configs: list[EvalConfig] = field(default_factory=lambda: resolve_configs(None))
    prompts: int = len(PAPER_PROMPTS)
    seeds: int = 2
    train_seeds: int = 1  # trainings per (style, configuration): recipe seed, seed + 1, ...
    steps: int | None = None  # None: the recipe's (300)
    resolution: int | None = None  # None: the backbone's default
    gen_steps: int | None = None  # None: the backbone's default (28)
    guidance: float | None = None  # None: the backbone's default (7.0)
    dino_model: str | None = None
    clip_model: str | None = None
    score: bool = True

    def validate(self) -> EvalSettings:
        if not 1 <= self.prompts <= len(PAPER_PROMPTS):
            raise InputError(f"--prompts must be between 1 and {len(PAPER_PROMPTS)}")
        if not 1 <= self.seeds <= 100:
            raise InputError("--seeds must be between 1 and 100")
        if isinstance(self.train_seeds, bool) or not isinstance(self.train_seeds, int) \
                or not 1 <= self.train_seeds <= 20:
            raise InputError("--train-seeds must be a whole number between 1 and 20")
        if self.gen_steps is not None and not 1 <= self.gen_steps <= 200:
            raise InputError("--gen-steps must be between 1 and 200")
        names = [c.name for c in self.configs]
        if len(set(names)) != len(names):
            raise InputError("configuration names must be unique")
        for c in self.configs:
            self.recipe(c)  # validates
        return self

    def recipe(self, cfg: EvalConfig, train_seed: int = 0) -> Recipe:
        """The recipe a configuration trains with: no previews (the grid shows the results); training
        ``train_seed`` (0, 1, ...) adds to the recipe's seed."""
        recipe = replace(Recipe(**cfg.overrides), preview_every=0)
        if train_seed:
            recipe = replace(recipe, seed=recipe.seed + train_seed)
        if self.steps is not None:
            recipe = replace(recipe, steps=self.steps)
        if self.resolution is not None:
            recipe = replace(recipe, resolution=self.resolution)
        return recipe.validate()

    def items(self) -> list[tuple[int, int]]:
        """(prompt index, seed) of every image a unit generates."""
        return [(p, s) for p in range(self.prompts) for s in range(self.seeds)]


# -- a unit's files -----------------------------------------------------------------------------


def unit_name(cfg_name: str, train_seed: int) -> str:
    """A unit's folder under ``units/<style>/``: the configuration's name, ``@train<k>`` for k > 0
    ('@' is not allowed in configuration names, so no configuration can collide with it)."""
    return cfg_name if train_seed == 0 else f"{cfg_name}@train{train_seed}"


def _image_name(prompt_index: int, seed: int) -> str:
    """A unit's image, relative to the unit folder (generation writes ``{stem}_{seed}.png``)."""
    return f"images/p{prompt_index:02d}_{seed}.png"


def _read_json(path: Path) -> dict | None:
    try:
        data = json.loads(path.read_text())
    except (OSError, ValueError):
        return None
    return data if isinstance(data, dict) else None
