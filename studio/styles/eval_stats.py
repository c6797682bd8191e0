"""The evaluation's statistics: finished units gathered per (style, configuration, training seed), means
with standard errors, and paired differences between configurations (issue 16).

Two kinds of spread are reported, because they answer different questions:

* a configuration's mean carries the **standard error over training seeds** (the mean over styles is
  taken per training seed, then the spread of those K means): how much the number would move if
  the whole experiment were rerun with other seeds;
* a difference between two configurations is **paired by style** (each style's mean over training
  seeds, config minus baseline) with the standard error over styles and the number of styles that
  moved each way: styles differ far more from each other than the samplers do, so only paired
  differences can show a sampler effect.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

# Which way is better for each metric: +1 higher (cosine similarities), -1 lower (distances).
DIRECTION = {"dino": 1, "clip_i": 1, "clip_t": 1, "clip_t_full": 1, "colour": -1, "texture": -1, "content": -1}


def mean_se(values: Iterable[float | None]) -> tuple[float | None, float | None]:
    """Mean and standard error of the mean (sample std / sqrt(n)) of the values that are not None;
    (None, None) for none, SE None for a single value."""
    vals = [float(v) for v in values if v is not None]
    if not vals:
        return None, None
    m = sum(vals) / len(vals)
    if len(vals) < 2:
        return m, None
    var = sum((v - m) ** 2 for v in vals) / (len(vals) - 1)
    return m, math.sqrt(var / len(vals))


class Aggregate:
    """Finished units (result.json dicts) indexed by (style, configuration, training seed)."""

    def __init__(self, rows: Sequence[dict], styles: Sequence[str], configs: Sequence[str], train_seeds: int):
        self.units = {(r["style"], r["config"], int(r.get("train_seed") or 0)): r for r in rows}
        self.styles, self.configs, self.seeds = list(styles), list(configs), list(range(train_seeds))
        self.complete = [s for s in self.styles
                         if all((s, c, k) in self.units for c in self.configs for k in self.seeds)]

    def has(self, key: str) -> bool:
        """Whether any finished unit has a value for ``key``."""
        return any(r.get(key) is not None for r in self.units.values())

    def unit(self, style: str, config: str, seed: int) -> dict | None:
        return self.units.get((style, config, seed))

    def style_value(self, style: str, config: str, key: str) -> tuple[float | None, float | None]:
        """A style's mean over its finished training seeds and the standard error over them."""
        return mean_se((self.units.get((style, config, k)) or {}).get(key) for k in self.seeds)

    def config_value(self, config: str, key: str) -> tuple[float | None, float | None]:
        """Mean over the complete styles and all training seeds; SE over the per-seed means."""
        per_seed = [mean_se(self.units[(s, config, k)].get(key) for s in self.complete)[0] for k in self.seeds]
        mean, se = mean_se(per_seed)
        return (mean, se) if self.complete else (None, None)

    def paired(self, config: str, baseline: str, key: str) -> dict | None:
        """``config - baseline`` per complete style (each a mean over training seeds): mean, SE over
        styles, and how many styles came out better / worse for ``config`` by :data:`DIRECTION`."""
        diffs = []
        for s in self.complete:
            a, b = self.style_value(s, config, key)[0], self.style_value(s, baseline, key)[0]
            if a is not None and b is not None:
                diffs.append(a - b)
        if not diffs:
            return None
        mean, se = mean_se(diffs)
        sign = DIRECTION.get(key, 1)
        return {"mean": mean, "se": se, "n": len(diffs), "better": sum(1 for d in diffs if d * sign > 0),
                "worse": sum(1 for d in diffs if d * sign < 0)}


def fmt(mean: float | None, se: float | None = None, digits: int = 3) -> str:
    """``0.461 ± 0.012``, ``0.461`` without an SE, ``–`` without a value."""
    if mean is None:
        return "–"
    return f"{mean:.{digits}f}" if se is None else f"{mean:.{digits}f} ± {se:.{digits}f}"
