"""Shared UI plumbing: turning StudioErrors into gr.Error, the page's CSS, the demo notice."""

from __future__ import annotations

import functools
import logging
from collections.abc import Callable
from typing import Any

import gradio as gr

from studio.errors import StudioError

log = logging.getLogger("studio.ui")


def guard(fn: Callable[..., Any]) -> Callable[..., Any]:
    """Run ``fn``; a StudioError becomes ``gr.Error(message)`` (shown to the user, sent to API
    clients), anything else is logged and reported as an internal error. The app keeps serving."""

    @functools.wraps(fn)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return fn(*args, **kwargs)
        except gr.Error:
            raise
        except StudioError as exc:
            raise gr.Error(str(exc), print_exception=False) from None
        except Exception as exc:  # a bug: keep the details in the log, give the user one line
            log.exception("%s failed", getattr(fn, "__name__", "event"))
            raise gr.Error(f"Something went wrong ({type(exc).__name__}); details are in the server log.",
                           print_exception=False) from None

    return wrapper


def keep_page(n_outputs: int, title: str = "Not done") -> Callable[[Callable[..., Any]], Callable[..., Any]]:
    """For the page's own buttons: a refused request shows its message as a notice that stays until
    closed, and every output keeps what it showed (``gr.Error`` would turn each output, the last
    run's plots and previews included, into an "Error" badge). API endpoints keep :func:`guard`."""

    def decorate(fn: Callable[..., Any]) -> Callable[..., Any]:
        @functools.wraps(fn)
        def wrapper(*args: Any, **kwargs: Any) -> Any:
            try:
                return fn(*args, **kwargs)
            except gr.Error as exc:
                message = exc.message
            except StudioError as exc:
                message = str(exc)
            except Exception as exc:  # a bug: the details go to the log, the user gets one line
                log.exception("%s failed", getattr(fn, "__name__", "event"))
                message = f"Something went wrong ({type(exc).__name__}); details are in the server log."
            gr.Warning(message, duration=None, title=title)
            skipped = tuple(gr.skip() for _ in range(n_outputs))
            return skipped[0] if n_outputs == 1 else skipped

        return wrapper

    return decorate


def demo_notice(backbone: str) -> str:
    """The banner shown while the studio runs on the tiny offline model."""
    if backbone != "tiny":
        return ""
    return (
        "**Demo mode — tiny offline model.** This machine has no GPU or no downloaded model weights, so the "
        "studio runs on a *tiny* model (a few MB, trains in seconds on a CPU). Everything works, but it only "
        "knows simple shapes, colours and landscapes at 64 px, so its pictures are sketches, not art. To train "
        "real styles, run on an NVIDIA GPU (12 GB+; the studio picks 8-bit or 4-bit weights on smaller cards) with "
        "FLUX.1-dev or Stable Diffusion 3.5: `hf auth login`, accept the model's licence on the Hub, then "
        "`python app.py --backbone flux-dev` (or `--backbone sd3.5-large`)."
    )


CSS = """
.gradio-container { max-width: 1400px !important; margin: 0 auto; }
#app-title h1 { margin-bottom: 0; }
#app-title p { margin-top: 2px; opacity: .8; }
#demo-notice { border-left: 4px solid #f59e0b; background: rgba(245, 158, 11, .10); padding: 8px 14px;
               border-radius: 8px; }
#demo-notice p { margin: 0; font-size: .92em; }
.job-card { border: 1px solid var(--border-color-primary); border-radius: 10px; padding: 12px 14px;
            background: var(--block-background-fill); }
.job-card.idle { opacity: .85; }
.job-head { display: flex; flex-wrap: wrap; gap: 8px; align-items: center; }
.job-meta { opacity: .8; font-variant-numeric: tabular-nums; }
.badge { border-radius: 999px; padding: 1px 10px; font-size: .85em; font-weight: 600; color: white;
         background: #6b7280; }
.badge.running { background: #2563eb; } .badge.done { background: #16a34a; }
.badge.failed { background: #dc2626; } .badge.cancelled { background: #6b7280; }
.badge.queued { background: #d97706; }
.bar { height: 10px; border-radius: 999px; background: var(--border-color-primary); margin: 10px 0 6px;
       overflow: hidden; }
.bar .fill { height: 100%; background: #2563eb; transition: width .6s ease; }
.bar .fill.done { background: #16a34a; } .bar .fill.failed { background: #dc2626; }
.bar .fill.cancelled { background: #9ca3af; }
.job-msg { font-size: .9em; opacity: .85; min-height: 1.2em; }
.hint { font-size: .9em; opacity: .8; }
#previews .caption-label { font-size: .75em; }
/* template tiles: as many columns as fit, so a phone gets two and a desktop five */
#gallery .grid-container, #template-previews .grid-container {
  grid-template-columns: repeat(auto-fill, minmax(110px, 1fr)) !important; }
/* results keep their own shape (a comic page is taller than wide): no square crop */
#generated .thumbnail-item { aspect-ratio: auto !important; height: auto !important; }
#generated .thumbnail-item img { height: auto !important; max-height: 600px; object-fit: contain !important; }
#template-previews .grid-container { grid-template-columns: repeat(auto-fill, minmax(90px, 1fr)) !important; }
"""
