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
    """The banner shown while the studio runs on the tiny offline model: one line, details on a click (on a
    phone the whole text would fill the first screen). It names the README's start command."""
    if backbone != "tiny":
        return ""
    return (
        "<details><summary><b>Demo mode — tiny offline model:</b> everything works, but pictures are 64 px "
        "sketches. <u>How to train real styles</u></summary><p>This machine has no GPU or no downloaded model "
        "weights, so the studio runs on a <i>tiny</i> model (a few MB, trains in seconds on a CPU). It only knows "
        "simple shapes, colours and landscapes at 64 px. To train real styles, run on an NVIDIA GPU (12 GB+; the "
        "studio picks 8-bit or 4-bit weights on smaller cards) with FLUX.1-dev or Stable Diffusion 3.5: "
        "<code>hf auth login</code>, accept the model's licence on the Hub, then "
        "<code>./run.sh --backbone flux-dev</code> (or <code>--backbone sd3.5-large</code>).</p></details>"
    )


CSS = """
.gradio-container { max-width: 1400px !important; margin: 0 auto; }
/* The Train tab's reference grid (studio.ui.references): tiles wrap, the grid scrolls, nothing is clipped. */
#ref-thumbs.ref-grid { display: block !important; max-height: 720px; overflow-y: auto; padding: 0 !important; }
#ref-thumbs.ref-grid:not(:has(.ref-tile)) { display: none !important; }
#ref-thumbs:has(> .ref-tile), #ref-thumbs div:has(> .ref-tile) {
  display: grid !important; grid-template-columns: repeat(auto-fill, minmax(160px, 1fr)); gap: 10px;
  align-items: start; width: 100%; }
.ref-tile { border: 1px solid var(--border-color-primary); border-radius: 10px; padding: 6px !important;
            background: var(--block-background-fill); min-width: 0 !important; gap: 6px !important; }
.ref-tile.bad { border-color: #dc2626; background: rgba(220, 38, 38, .06); }
.ref-tile .tile-img img { object-fit: contain; background: var(--background-fill-secondary); }
.tile-meta { display: flex; flex-direction: column; font-size: .8em; line-height: 1.3; min-width: 0; }
.tile-meta b { overflow: hidden; text-overflow: ellipsis; white-space: nowrap; }
.tile-meta span { opacity: .75; }
.tile-bad { display: flex; flex-direction: column; gap: 4px; font-size: .85em; padding: 6px 4px; min-height: 120px;
            overflow-wrap: anywhere; }
.tile-bad span { color: #b91c1c; }
.tile-bad em { opacity: .75; }
.ref-tile .tile-caption textarea { font-size: .88em; }
.tile-actions { gap: 6px !important; flex-wrap: nowrap !important; }
.tile-actions button { min-width: 0 !important; flex: 1 1 0; }
#caption-bar { align-items: center; }
#caption-note p { margin: 0; font-size: .88em; }
#app-title h1 { margin-bottom: 0; }
#app-title p { margin-top: 2px; opacity: .8; }
#demo-notice { border-left: 4px solid #f59e0b; background: rgba(245, 158, 11, .10); padding: 8px 14px;
               border-radius: 8px; }
#demo-notice p { margin: 4px 0 0; font-size: .92em; }
#demo-notice summary { cursor: pointer; font-size: .92em; }
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
/* the export's link says what it does (Gradio shows only the size there; the name is beside it) */
#export-file a::before { content: "Download again · "; }
/* long commands in the caption note wrap on a phone instead of running out of the box */
#caption-note code { white-space: normal; overflow-wrap: anywhere; }
/* the jobs table never widens the page (a phone scrolls the table, not the whole studio) */
#jobs-table { contain: inline-size; width: 100%; overflow-x: auto; }
@media (max-width: 600px) { #jobs-table { font-size: .85em; } }
/* a phone stacks the Train tab: while a job runs its status goes above the form */
@media (max-width: 700px) {
  #train-row:has(#job-status .job-card.running, #job-status .job-card.queued) { flex-direction: column-reverse; } }
"""
