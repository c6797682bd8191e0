"""Training progress on the terminal (tqdm)."""

from __future__ import annotations

import sys
from pathlib import Path

from tqdm import tqdm

from studio.engine.training import Observer, StepReport


class TqdmObserver(Observer):
    """Shows step, loss, the sampled noise levels and ETA as a tqdm bar on stderr."""

    def __init__(self, total: int):
        self.bar = tqdm(total=total, desc="training", unit="step", file=sys.stderr, dynamic_ncols=True)

    def __enter__(self) -> TqdmObserver:
        return self

    def __exit__(self, *exc) -> None:
        self.bar.close()

    def on_step(self, report: StepReport) -> None:
        self.bar.n = report.step
        t = ",".join(f"{v:.2f}" for v in report.t)
        self.bar.set_postfix_str(f"loss {report.loss:.4f} t [{t}]", refresh=False)
        self.bar.refresh()

    def on_preview(self, step: int, files: list[Path]) -> None:
        self.bar.write(f"previews at step {step}: {files[0].parent}")
