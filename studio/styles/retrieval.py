"""Style retrieval: the template gallery as a style database queried in CLIP space (seed 004), and
each template's style scores (seed 000's DINO / CLIP-I / CLIP-T on its previews).

Retrieval-augmented diffusion swaps its image database for a style database at inference time and
queries it with CLIP embeddings. Here the database is the template store: every template's
reference images and its final-step previews (step 0 previews are the base model, not the style)
are embedded with the CLIP ViT-B/32 image tower of :mod:`studio.styles.metrics`, and

* :meth:`StyleIndex.search_text` ranks templates by CLIP text-image similarity to a query, after
  the templates whose name or style prompt contain every query word (an artist who types
  "watercolor" expects "My watercolors" first);
* :meth:`StyleIndex.search_images` ranks them by image-image similarity to one or more dropped
  images: per query image the best-matching image of a template (max), averaged over the query
  images. That also answers "you may already have this style" for references uploaded to train.

**The index is a cache; the store stays the source of truth.** It lives in
``<store>/.index/clip-<model key>.npz`` (one array of embeddings plus a JSON list of what each row
is: template id, file, kind, size and mtime), is written atomically (temp file + ``os.replace``,
so several processes sharing a data folder never read half a file; the last writer wins) and is
brought up to date by :meth:`StyleIndex.sync` before every search: templates that came are
embedded, templates that went (or whose files changed) are dropped. With nothing changed a sync
costs one directory listing, one ``template.json`` read and a few ``stat`` calls per template.
Delete the folder and the next search rebuilds it. The model key changes with the CLIP model, so
embeddings of two models never mix.

**Scores** (:func:`template_scores`) are computed on first request with
:func:`studio.styles.metrics.score_template` and cached in ``<store>/.index/scores/<id>.json`` with a
signature of the files they were computed from, so imported templates get scores too and a
template whose previews change is rescored.

**Where this runs: the web process, on the CPU.** Searches must answer while the GPU worker is
busy training (a queued job would wait minutes), and CLIP ViT-B/32 + DINO ViT-S/16 are small
(~0.2 B parameters together; ~50 ms per image on a CPU core). Keeping them off the GPU keeps the
web process from taking GPU memory next to FLUX. The models load lazily on the first search or
card view, never at import time, and never download (:func:`studio.styles.metrics.default_scorer`).

Without the metric models, text search falls back to the name / style-prompt match with a note
saying why; image search and scores raise / report the reason.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import logging
import os
import re
import threading
import uuid
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from studio.errors import InputError, StudioError
from studio.store.templates import INDEX_DIR, TemplateInfo, TemplateStore, write_json_atomic
from studio.styles.metrics import CLIP_ENV, DINO_ENV, StyleScorer, default_scorer

log = logging.getLogger(__name__)

INDEX_VERSION = 1
DEFAULT_K = 8
SIMILAR_MIN = 0.80  # CLIP ViT-B/32 image cosine: same style ~0.85-0.95, unrelated pictures ~0.4-0.7
EMBED_BATCH = 16  # images decoded and embedded at a time: bounds the memory of a first big sync
_STEP = re.compile(r"step_(\d+)_p\d+(?:_s\d+)?\.png$")
_WEIGHTS = ("model.safetensors", "pytorch_model.bin")
MODELS_HINT = (f"download them with `hf download facebook/dino-vits16` and `hf download "
               f"openai/clip-vit-base-patch32`, or set {DINO_ENV} and {CLIP_ENV} to local copies")


class RetrievalUnavailable(StudioError):
    """The metric models are not on this machine (the message says which and how to get them)."""


def shared_scorer() -> StyleScorer:
    """The process's scorer for retrieval and scores: lazily loaded, never downloads, on the CPU."""
    return default_scorer(device="cpu")


def template_images(info: TemplateInfo) -> list[tuple[str, Path]]:
    """``(kind, file)`` of the images that stand for a template's style: its references and the
    previews of its last preview step (step 0 shows the base model, so it never counts)."""
    images = [("reference", p) for p in info.references]
    steps: dict[int, list[Path]] = {}
    for path in info.previews:
        match = _STEP.search(path.name)
        if match and int(match[1]) > 0:
            steps.setdefault(int(match[1]), []).append(path)
    if steps:
        images += [("preview", p) for p in sorted(steps[max(steps)])]
    return images


def _stat_key(path: Path) -> tuple[int, int] | None:
    try:
        st = path.stat()
    except OSError:
        return None
    return st.st_size, st.st_mtime_ns


def model_key(source: str) -> str:
    """A short id of a model's weights: its folder and weight files' size + mtime, or the hub
    snapshot it resolves to. Embeddings of different models must never share an index."""
    folder = Path(source).expanduser()
    parts = [source]
    if folder.is_dir():
        parts = [str(folder.resolve())] + [f"{w}:{_stat_key(folder / w)}" for w in _WEIGHTS]
    else:
        from huggingface_hub import try_to_load_from_cache

        parts.append(str(try_to_load_from_cache(source, "config.json")))  # the path names the snapshot
    return hashlib.sha1("|".join(parts).encode()).hexdigest()[:12]


@dataclass
class Hit:
    """One search result: the template, its similarity to the query (None: not embedded, e.g. an
    imported LoRA without images), why it matched ("name": the words are in its name or style
    prompt, "look": CLIP similarity only) and its image closest to the query (shown as its tile:
    the gallery then says *why* a template came up)."""

    template: TemplateInfo
    similarity: float | None
    matched: str
    closest: Path | None = None


@dataclass
class SearchResult:
    """Ranked hits plus a note for the user (which search ran, or why only a name search could)."""

    hits: list[Hit]
    mode: str  # "text" (CLIP + names), "names" (no models: names only), "image"
    note: str


@dataclass
class _State:
    entries: list[dict]  # one per row of ``embeddings``: template, file, kind, size, mtime_ns
    embeddings: np.ndarray  # (N, D) float32, L2-normalised
    skipped: list[dict]  # unreadable images, with their signature, so a sync does not retry them forever
    file_id: tuple[int, int] | None  # (size, mtime_ns) of the index file this state was read from / written to


class StyleIndex:
    """A CLIP-space index over every template's references and final previews, kept on disk.

    ``store``: the template store (the truth); ``scorer``: the CLIP model to embed with (default
    :func:`shared_scorer`). Thread-safe within a process; safe across processes sharing the store.
    """

    def __init__(self, store: TemplateStore, scorer: StyleScorer | None = None):
        self.store = store
        self.scorer = scorer or shared_scorer()
        self._lock = threading.Lock()
        self._state: _State | None = None
        self.embedded = 0  # images embedded by this object (tests: a no-change sync embeds nothing)

    # -- availability and location --------------------------------------------------------------

    def available(self) -> tuple[bool, str]:
        """(True, "") when the CLIP model can be used here, else (False, why)."""
        return self.scorer.available()

    def _require(self) -> None:
        ok, reason = self.available()
        if not ok:
            # the reason already says how to get each missing model; the general hint only when it does not
            hint = "" if "hf download" in reason else f"; {MODELS_HINT}"
            raise RetrievalUnavailable(f"finding styles by look needs the metric models, which are not here "
                                       f"({reason}){hint}")

    @property
    def folder(self) -> Path:
        return self.store.root / INDEX_DIR

    @property
    def path(self) -> Path:
        return self.folder / f"clip-{model_key(self.scorer.clip_source)}.npz"

    # -- persistence ----------------------------------------------------------------------------

    def _read(self) -> _State:
        """The index on disk (an empty one when it is missing, damaged or from another version)."""
        path = self.path
        file_id = _stat_key(path)
        if file_id is None:
            return _State([], np.zeros((0, 0), np.float32), [], None)
        try:
            with np.load(path, allow_pickle=False) as data:  # never unpickle: the data folder may be shared
                meta = json.loads(str(data["meta"]))
                embeddings = np.asarray(data["embeddings"], np.float32)
            if meta.get("version") != INDEX_VERSION or len(meta["entries"]) != len(embeddings):
                raise ValueError("version or shape mismatch")
            return _State(list(meta["entries"]), embeddings, list(meta.get("skipped") or []), file_id)
        except Exception as exc:  # noqa: BLE001 - a cache: any damage means "rebuild"
            log.warning("style index %s is unreadable (%s); rebuilding it", path, exc)
            return _State([], np.zeros((0, 0), np.float32), [], None)

    def _write(self, state: _State) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        path = self.path
        tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}.tmp.npz")
        meta = {"version": INDEX_VERSION, "model": self.scorer.clip_source, "entries": state.entries,
                "skipped": state.skipped}
        try:
            with open(tmp, "xb") as f:
                np.savez(f, embeddings=state.embeddings, meta=np.array(json.dumps(meta)))
                f.flush()
                os.fsync(f.fileno())
            os.replace(tmp, path)
        finally:
            with contextlib.suppress(OSError):
                os.unlink(tmp)
        state.file_id = _stat_key(path)

    # -- keeping up with the store --------------------------------------------------------------

    def sync(self, progress: Callable[[int, int], None] | None = None) -> dict[str, int]:
        """Bring the index up to date with the store; returns {"added", "removed", "total"} (images).

        ``progress(done, total)`` is called while new images are embedded. Unreadable images are
        logged and remembered (not retried until they change).
        """
        self._require()
        with self._lock:
            state = self._state
            if state is None or state.file_id != _stat_key(self.path):  # first use, or another process wrote
                state = self._read()
            wanted: dict[tuple[str, str], dict] = {}
            for info in self.store.list():
                for kind, path in template_images(info):
                    key = _stat_key(path)
                    if key is not None:
                        rel = path.relative_to(info.path).as_posix()
                        wanted[(info.id, rel)] = {"template": info.id, "file": rel, "kind": kind,
                                                  "size": key[0], "mtime_ns": key[1]}
            keep = [i for i, e in enumerate(state.entries) if wanted.get((e["template"], e["file"])) == e]
            skipped = [s for s in state.skipped if wanted.get((s["template"], s["file"])) == s]
            known = {(e["template"], e["file"]) for e in (state.entries[i] for i in keep)}
            known |= {(s["template"], s["file"]) for s in skipped}
            new = [entry for key, entry in wanted.items() if key not in known]
            removed = len(state.entries) - len(keep)
            if not new and not removed and len(skipped) == len(state.skipped):
                self._state = state
                return {"added": 0, "removed": 0, "total": len(state.entries)}
            entries = [state.entries[i] for i in keep]
            blocks = [state.embeddings[keep]] if keep else []
            for start in range(0, len(new), EMBED_BATCH):
                batch, images = [], []
                for entry in new[start: start + EMBED_BATCH]:
                    image = self._open(self.store.root / entry["template"] / entry["file"])
                    if image is None:
                        skipped.append(entry)
                    else:
                        batch.append(entry)
                        images.append(image)
                if images:
                    blocks.append(self.scorer.embed_images(images).numpy().astype(np.float32))
                    entries += batch
                    self.embedded += len(images)
                if progress:
                    progress(min(start + EMBED_BATCH, len(new)), len(new))
            embeddings = np.concatenate(blocks) if blocks else np.zeros((0, 0), np.float32)
            state = _State(entries, embeddings, skipped, None)
            self._write(state)
            self._state = state
            self._prune_scores({e["template"] for e in wanted.values()})
            return {"added": len(entries) - len(keep), "removed": removed, "total": len(entries)}

    @staticmethod
    def _open(path: Path):
        from studio.media.images import load_image

        try:
            return load_image(path)
        except InputError as exc:
            log.warning("style index: skipping %s: %s", path, exc)
            return None

    def _prune_scores(self, present: set[str]) -> None:
        """Drop cached scores of templates that are gone (their ids may be reused later)."""
        folder = self.folder / "scores"
        if folder.is_dir():
            for f in folder.glob("*.json"):
                if f.stem not in present and not f.name.startswith("."):
                    with contextlib.suppress(OSError):
                        f.unlink()

    # -- queries --------------------------------------------------------------------------------

    def _per_template(self, queries: np.ndarray) -> dict[str, tuple[float, Path]]:
        """Per template: (mean over query rows of the best cosine with any of its images, the image
        closest to the queries on average)."""
        state = self._state
        if state is None or not state.entries:
            return {}
        sims = queries @ state.embeddings.T  # (Q, N)
        rows: dict[str, list[int]] = {}
        for i, entry in enumerate(state.entries):
            rows.setdefault(entry["template"], []).append(i)
        out = {}
        for tid, cols in rows.items():
            best = state.entries[cols[int(sims[:, cols].mean(axis=0).argmax())]]
            out[tid] = (float(np.clip(sims[:, cols].max(axis=1).mean(), -1.0, 1.0)),
                        self.store.root / best["template"] / best["file"])
        return out

    def search_text(self, query: str, k: int = DEFAULT_K) -> SearchResult:
        """Templates for a text query: name / style-prompt matches first, then by CLIP text-image similarity.

        Without the metric models: the name / style-prompt matches only, with a note saying why.
        """
        query = " ".join(str(query or "").split())
        if not query:
            raise InputError("type something to search for, e.g. “watercolor”")
        k = _check_k(k)
        named = {info.id: info for info in self.store.list(query)}
        ok, reason = self.available()
        if not ok:
            hits = [Hit(info, None, "name") for info in named.values()][:k]
            return SearchResult(hits, "names", f"Searched names and style prompts only: finding styles by look "
                                               f"needs the metric models ({reason}).")
        self.sync()
        text = self.scorer.embed_texts([query]).numpy()
        sims = self._per_template(text)
        ranked = []
        for info in self.store.list():
            similarity, closest = sims.get(info.id, (None, None))
            ranked.append(Hit(info, similarity, "name" if info.id in named else "look", closest))
        ranked.sort(key=lambda h: (h.matched != "name", h.similarity is None, -(h.similarity or 0.0)))
        ranked = [h for h in ranked if h.matched == "name" or h.similarity is not None][:k]
        return SearchResult(ranked, "text", f"Best matches for “{query}” first: by name and style prompt, "
                                            "then by how the templates' images look.")

    def search_images(self, images: Sequence[str | os.PathLike], k: int = DEFAULT_K,
                      min_similarity: float | None = None) -> SearchResult:
        """Templates whose references / previews look most like ``images`` (1 to 20 files).

        Each query image is compared to each template's images; a template's similarity is the best
        match per query image, averaged over the query images. ``min_similarity`` drops weaker ones.
        """
        from studio.media.images import load_reference_images

        k = _check_k(k)
        pictures = load_reference_images([str(p) for p in images])  # clear errors for bad files, before any model
        self._require()
        self.sync()
        queries = self.scorer.embed_images(pictures).numpy()
        sims = self._per_template(queries)
        infos = {info.id: info for info in self.store.list()}
        hits = [Hit(infos[tid], sim, "look", closest) for tid, (sim, closest) in sims.items() if tid in infos]
        if min_similarity is not None:
            hits = [h for h in hits if h.similarity >= float(min_similarity)]
        hits.sort(key=lambda h: -h.similarity)
        what = "your image" if len(pictures) == 1 else f"your {len(pictures)} images"
        note = f"Styles most like {what} first." if hits else f"No template looks like {what}."
        return SearchResult(hits[:k], "image", note)


def _check_k(k: Any) -> int:
    try:
        value = int(k if k not in (None, "") else DEFAULT_K)
    except (TypeError, ValueError):
        raise InputError(f"the number of results must be a whole number, not {k!r}") from None
    if not 1 <= value <= 100:
        raise InputError(f"ask for 1 to 100 results (got {value})")
    return value


# --------------------------------------------------------------------------- scores

def _scores_signature(info: TemplateInfo, scorer: StyleScorer) -> str:
    """What the scores depend on: the images, the preview prompts, the style prompt and the models."""
    meta = info.meta
    parts = [json.dumps([meta.get("style_prompt"), meta.get("preview_prompts"), meta.get("previews"),
                         meta.get("references")], sort_keys=True, default=str),
             model_key(scorer.dino_source), model_key(scorer.clip_source)]
    parts += [f"{p.relative_to(info.path).as_posix()}:{_stat_key(p)}" for _, p in template_images(info)]
    return hashlib.sha1("\n".join(parts).encode()).hexdigest()


def template_scores(store: TemplateStore, template_id: str, scorer: StyleScorer | None = None) -> dict[str, Any]:
    """A template's style scores on its final previews, computed once and cached.

    Returns ``{"available": True, "dino", "clip_i", "clip_t", "clip_t_full", "n_images", "step",
    "previews", "prompts", "per_image"}`` (see :func:`studio.styles.metrics.score_template`) or
    ``{"available": False, "reason": ...}`` when the metric models are missing or the template has
    nothing to score (e.g. an imported LoRA without previews).
    """
    from studio.styles.metrics import score_template

    scorer = scorer or shared_scorer()
    info = store.get(template_id)
    ok, reason = scorer.available()
    if not ok:
        return {"available": False, "models_missing": True,
                "reason": f"the metric models are not on this machine ({reason}); {MODELS_HINT}"}
    signature = _scores_signature(info, scorer)
    cache = store.root / INDEX_DIR / "scores" / f"{info.id}.json"
    try:
        cached = json.loads(cache.read_text())
        if cached.get("signature") == signature:
            return {"available": True, **cached["scores"]}
    except (OSError, ValueError, KeyError, TypeError, AttributeError):
        pass
    result = score_template(info.path, scorer)
    if "unavailable" in result:  # no previews / references: cheap to find out again, not cached
        return {"available": False, "models_missing": False, "reason": result["unavailable"]}
    cache.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(cache, {"signature": signature, "scores": result})
    return {"available": True, **result}
