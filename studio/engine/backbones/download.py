"""First run: download a backbone from the Hugging Face Hub with progress, a disk check and clear errors.

``from_pretrained("black-forest-labs/FLUX.1-dev")`` fetches ~34 GB without a word. :func:`ensure_downloaded`
does the download first, file by file through ``hf_hub_download`` (the ordinary Hugging Face cache, so
``hf download`` and diffusers see the same files), and:

* takes only what diffusers loads for a pipeline folder: ``model_index.json`` and its components'
  configs, tokenizers and ``.safetensors`` weights, not the single-file checkpoints beside them;
* refuses before the first weight byte when the cache's disk cannot hold what is missing;
* reports bytes, speed and ETA through ``on_progress`` (at most every ``interval_s``);
* retries a broken transfer (``hf_hub_download`` itself resumes a cut stream with a ``Range`` request;
  a retry here starts the current file again, finished files are kept);
* turns the Hub's errors (gated licence, unknown repo, offline) into one line saying what to do.

It returns the local snapshot folder, which ``from_pretrained`` loads without the network.
"""

from __future__ import annotations

import inspect
import json
import logging
import re
import threading
import time
from collections import deque
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path, PurePosixPath

import huggingface_hub
from huggingface_hub import constants, hf_hub_download
from huggingface_hub.errors import (
    EntryNotFoundError,
    GatedRepoError,
    HfHubHTTPError,
    LocalEntryNotFoundError,
    OfflineModeIsEnabled,
    RepositoryNotFoundError,
    RevisionNotFoundError,
)
from huggingface_hub.file_download import repo_folder_name
from tqdm.std import tqdm

from studio import diskspace
from studio.errors import StudioError

log = logging.getLogger(__name__)

INDEX_FILE = "model_index.json"
# Weights diffusers never reads from a torch pipeline folder (other frameworks, exports).
FOREIGN_WEIGHTS = (".onnx", ".onnx_data", ".msgpack", ".h5", ".pb", ".tflite", ".ot", ".gguf")
PICKLE_WEIGHTS = (".bin", ".pt", ".pth", ".ckpt")  # only fetched where a component has no .safetensors
VARIANTS = ("fp16", "bf16", "fp32", "non_ema", "ema")  # `<name>.fp16.safetensors`: not loaded without variant=
INDEX_SUFFIX = re.compile(r"\.index(\.[a-z0-9_]+)?\.json$")  # weights.safetensors.index[.fp16].json
# model.fp16.safetensors, model.fp16-00001-of-00002.safetensors, model.safetensors.index.fp16.json
_ANY_VARIANT = "|".join(VARIANTS)
VARIANT_NAME = re.compile(rf"\.({_ANY_VARIANT})(-\d+-of-\d+)?\.[a-z0-9_]+$|\.index\.({_ANY_VARIANT})\.json$")
LOG_EVERY_S = 15.0  # without a callback, progress goes to the log this often
SPEED_WINDOW_S = 10.0  # speed and ETA are measured over the last seconds, not since the start


class DownloadError(StudioError):
    """A backbone could not be downloaded; the message says why and what to do."""


@dataclass(frozen=True)
class DownloadProgress:
    """Where a download stands; :meth:`describe` says it in one line."""

    repo_id: str
    total_bytes: int
    done_bytes: int  # including files that were already in the cache
    files_total: int
    files_done: int
    current_file: str | None = None
    bytes_per_s: float | None = None  # None until there is a measurement
    eta_s: float | None = None

    @property
    def name(self) -> str:
        return self.repo_id.rsplit("/", 1)[-1]

    @property
    def finished(self) -> bool:
        return self.files_done >= self.files_total

    def describe(self) -> str:
        """E.g. ``downloading FLUX.1-dev: 12.3 of 33.9 GB, 85 MB/s, ETA 4 min (transformer/...safetensors)``."""
        if self.finished:
            return f"downloaded {self.name} ({_size(self.total_bytes)}, {self.files_total} files)"
        unit, scale = _unit(self.total_bytes)
        text = f"downloading {self.name}: {self.done_bytes / scale:.1f} of {self.total_bytes / scale:.1f} {unit}"
        if self.bytes_per_s:
            text += f", {_size(self.bytes_per_s, whole_from=10)}/s"
        if self.eta_s is not None:
            text += f", ETA {_duration(self.eta_s)}"
        return text + (f" ({self.current_file})" if self.current_file else "")


def _unit(n: float) -> tuple[str, float]:
    for unit, scale in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return unit, scale
    return "bytes", 1.0


def _size(n: float, whole_from: float = 100) -> str:
    """``n`` bytes in the largest fitting unit; one decimal below ``whole_from`` of that unit."""
    unit, scale = _unit(n)
    return f"{n:.0f} bytes" if scale == 1.0 else f"{n / scale:.{0 if n / scale >= whole_from else 1}f} {unit}"


def _duration(seconds: float) -> str:
    seconds = max(0, round(seconds))
    if seconds < 60:
        return f"{seconds} s"
    if seconds < 3600:
        return f"{round(seconds / 60)} min"
    return f"{seconds // 3600} h {seconds % 3600 // 60:02d} min"


def select_files(siblings, model_index: dict) -> list:
    """The repository files ``from_pretrained`` needs for this pipeline: ``model_index.json`` and its components.

    ``siblings`` are :class:`huggingface_hub.hf_api.RepoSibling` (``rfilename``, ``size``, ...). Files
    outside the components' folders (README, sample images, single-file checkpoints such as
    ``flux1-dev.safetensors``, SD3.5's ComfyUI ``text_encoders/``) are skipped, and so are other
    frameworks' weights and ``.bin`` copies of weights that exist as ``.safetensors``.
    """
    components = {key for key, value in model_index.items()
                  if not key.startswith("_") and isinstance(value, list) and value and value[0] is not None}
    by_folder: dict[str, list] = {}
    chosen = []
    for sibling in siblings:
        path = PurePosixPath(sibling.rfilename)
        if sibling.rfilename == INDEX_FILE:
            chosen.append(sibling)
        elif len(path.parts) > 1 and path.parts[0] in components:
            by_folder.setdefault(path.parts[0], []).append(sibling)
    for files in by_folder.values():
        has_safetensors = any(_weight_kind(s.rfilename) == "safetensors" and not _is_variant(s.rfilename)
                              for s in files)
        for sibling in files:
            kind = _weight_kind(sibling.rfilename)
            if kind == "foreign" or (has_safetensors and (kind == "pickle" or _is_variant(sibling.rfilename))):
                continue
            chosen.append(sibling)
    return chosen


def _weight_kind(filename: str) -> str | None:
    """'safetensors', 'pickle', 'foreign' or None (not weights: configs, tokenizers); shard indexes count as weights."""
    name = INDEX_SUFFIX.sub("", filename.lower())
    if name.endswith(".safetensors"):
        return "safetensors"
    if name.endswith(PICKLE_WEIGHTS):
        return "pickle"
    return "foreign" if name.endswith(FOREIGN_WEIGHTS) else None


def _is_variant(filename: str) -> bool:
    return bool(VARIANT_NAME.search(filename.lower()))


class _Tracker:
    """Counts bytes across files, measures speed and calls ``on_progress`` at most every ``interval_s``."""

    def __init__(self, repo_id: str, total: int, files_total: int, done: int, files_done: int,
                 on_progress: Callable[[DownloadProgress], None], interval_s: float):
        self.repo_id, self.on_progress, self.interval_s = repo_id, on_progress, interval_s
        self.total, self.files_total = total, files_total
        self.done, self.files_done = done, files_done
        self.current: str | None = None
        self.current_size = self.current_bytes = 0
        self.moved = 0  # bytes transferred in this call, for the speed
        self.samples: deque[tuple[float, int]] = deque()
        self.last_emit = 0.0
        self.lock = threading.Lock()  # the polling fallback reports from its own thread

    def start_file(self, filename: str, size: int) -> None:
        self.current, self.current_size, self.current_bytes = filename, size, 0
        self.emit()

    def file_bytes(self, n: int) -> None:
        """The current file has ``n`` bytes on disk."""
        n = max(0, min(int(n), self.current_size or int(n)))
        with self.lock:
            self.moved += n - self.current_bytes
            self.current_bytes = n
        self.emit()

    def end_file(self) -> None:
        with self.lock:
            self.moved += self.current_size - self.current_bytes
            self.done += self.current_size
            self.files_done += 1
            self.current, self.current_size, self.current_bytes = None, 0, 0
        self.emit(force=self.files_done == self.files_total)

    def progress(self) -> DownloadProgress:
        now = time.monotonic()
        self.samples.append((now, self.moved))
        while len(self.samples) > 2 and now - self.samples[1][0] >= SPEED_WINDOW_S:
            self.samples.popleft()
        (t0, b0), (t1, b1) = self.samples[0], self.samples[-1]
        speed = (b1 - b0) / (t1 - t0) if t1 - t0 >= 1.0 and b1 > b0 else None
        done = self.done + self.current_bytes
        return DownloadProgress(self.repo_id, self.total, done, self.files_total, self.files_done,
                                self.current, speed, (self.total - done) / speed if speed else None)

    def emit(self, force: bool = False) -> None:
        with self.lock:
            now = time.monotonic()
            if not force and now - self.last_emit < self.interval_s:
                return
            self.last_emit = now
            progress = self.progress()
        try:
            self.on_progress(progress)
        except Exception:  # showing progress must not break a 34 GB download
            log.warning("could not report the download progress", exc_info=True)


def _bar_class(tracker: _Tracker) -> type[tqdm]:
    """A silent tqdm that hands ``hf_hub_download``'s per-chunk byte counts to ``tracker``."""

    class ProgressBar(tqdm):
        def __init__(self, *args, **kwargs):
            kwargs["disable"] = True  # the studio shows progress its own way; no bars in worker logs
            super().__init__(*args, **kwargs)
            self.bytes_on_disk = int(kwargs.get("initial") or 0)
            tracker.file_bytes(self.bytes_on_disk)

        def update(self, n: float | None = 1) -> bool | None:
            self.bytes_on_disk += int(n or 0)
            tracker.file_bytes(self.bytes_on_disk)
            return None

        # Xet downloads also report network bytes; what counts here is what reached the disk.
        def update_transfer(self, n: float | None = 1) -> None:
            pass

        def set_transfer_postfix_str(self, *args, **kwargs) -> None:
            pass

    return ProgressBar


@contextmanager
def _poll_partial_files(storage: Path, tracker: _Tracker) -> Iterator[None]:
    """For a ``huggingface_hub`` without ``tqdm_class``: watch the size of the partial file instead."""
    stop = threading.Event()

    def poll() -> None:
        while not stop.wait(max(tracker.interval_s, 0.2)):
            sizes = [p.stat().st_size for p in (storage / "blobs").glob("*.incomplete") if p.is_file()]
            if sizes:
                tracker.file_bytes(max(sizes))

    thread = threading.Thread(target=poll, name="download-progress", daemon=True)
    thread.start()
    try:
        yield
    finally:
        stop.set()
        thread.join()


def _log_progress(progress: DownloadProgress) -> None:
    log.info("%s", progress.describe())


def ensure_downloaded(repo_id: str, *, revision: str | None = None,
                      on_progress: Callable[[DownloadProgress], None] | None = None,
                      cache_dir: str | Path | None = None, retries: int = 3, retry_wait_s: float = 2.0,
                      interval_s: float = 0.5, index_file: str | None = None,
                      select: Callable[[list, Path], list] | None = None) -> Path:
    """Make sure the diffusers pipeline ``repo_id`` is complete in the Hugging Face cache; its snapshot folder.

    Another kind of repository (a transformers model) names its first, small file ``index_file``
    (e.g. ``config.json``) and ``select(siblings, index_path)`` picks the files it needs.

    Nothing is transferred for files already in the cache. Before downloading the rest, the free space
    on the cache's disk is checked (:class:`studio.diskspace.DiskFullError` with the numbers).
    ``on_progress`` gets a :class:`DownloadProgress` at most every ``interval_s`` seconds and always
    once at the end (without it, progress goes to the log); it is not called when nothing was missing.
    Each file is tried ``retries`` times. Offline (``HF_HUB_OFFLINE=1``) or with the Hub out of reach,
    a snapshot already in the cache is returned as it is. Errors are :class:`DownloadError` (one line).
    """
    name = repo_id.rsplit("/", 1)[-1]
    cache = Path(cache_dir or constants.HF_HUB_CACHE).expanduser()
    storage = cache / repo_folder_name(repo_id=repo_id, repo_type="model")
    try:
        info = huggingface_hub.HfApi().model_info(repo_id, revision=revision, files_metadata=True)
    except Exception as exc:
        cached = _cached_snapshot(storage, revision) if _is_unreachable(exc) else None
        if cached is None:
            raise _user_error(exc, repo_id) from exc
        log.info("the Hub is out of reach; using the cached copy of %s in %s", repo_id, cached)
        return cached

    def fetch(filename: str, commit: str, **progress_kwargs) -> Path:
        for attempt in range(1, retries + 1):
            try:
                return Path(hf_hub_download(repo_id, filename, revision=commit, cache_dir=cache_dir,
                                            **progress_kwargs))
            except Exception as exc:
                if attempt == retries or not _worth_retrying(exc):
                    raise _user_error(exc, repo_id) from exc
                log.warning("downloading %s/%s failed (%s); trying again (%d of %d)",
                            repo_id, filename, _short(exc), attempt + 1, retries)
                time.sleep(retry_wait_s * attempt)
        raise AssertionError("retries < 1")

    # The small index first: it names the components, and a gated repo refuses here. Asking for the
    # branch (not the commit) records refs/<branch> in the cache, so offline loads find the snapshot.
    index_path = fetch(index_file or INDEX_FILE, revision or "main")
    pinned = index_path.parent.name  # the commit: every other file comes from the same one
    if select is not None:
        files = select(info.siblings or [], index_path)
    else:
        files = select_files(info.siblings or [], json.loads(index_path.read_text()))
    missing = [s for s in files if not _in_cache(storage, pinned, s)]
    remaining = sum(int(s.size or 0) for s in missing)
    if not missing:
        return storage / "snapshots" / pinned
    free = diskspace.free_bytes(cache)
    if free < remaining + diskspace.MARGIN_BYTES:
        raise diskspace.DiskFullError(
            f"not enough disk space to download {name}: {_size(remaining)} still to download, "
            f"{_size(free)} free on {cache}; free some space or set HF_HOME to a folder on a bigger disk")

    total = sum(int(s.size or 0) for s in files)
    tracker = _Tracker(repo_id, total, len(files), total - remaining, len(files) - len(missing),
                       on_progress or _log_progress, interval_s if on_progress else max(interval_s, LOG_EVERY_S))
    log.info("downloading %s: %s in %d files into %s", repo_id, _size(remaining), len(missing), cache)
    per_byte = "tqdm_class" in inspect.signature(hf_hub_download).parameters
    for sibling in sorted(missing, key=lambda s: int(s.size or 0)):  # small files first: errors show early
        tracker.start_file(sibling.rfilename, int(sibling.size or 0))
        if per_byte:
            fetch(sibling.rfilename, pinned, tqdm_class=_bar_class(tracker))
        else:
            with _poll_partial_files(storage, tracker):
                fetch(sibling.rfilename, pinned)
        tracker.end_file()
    return storage / "snapshots" / pinned


def _in_cache(storage: Path, commit: str, sibling) -> bool:
    """Whether a file is complete in the cache: in this snapshot, or as a blob another snapshot shares."""
    if (storage / "snapshots" / commit / sibling.rfilename).is_file():
        return True
    etag = sibling.lfs.sha256 if sibling.lfs else sibling.blob_id
    return bool(etag) and (storage / "blobs" / etag).is_file()


def _cached_snapshot(storage: Path, revision: str | None) -> Path | None:
    """The cached snapshot for ``revision`` (a branch or a commit) when it has a ``model_index.json``."""
    revision = revision or "main"
    ref = storage / "refs" / revision
    commit = ref.read_text().strip() if ref.is_file() else revision
    folder = storage / "snapshots" / commit
    return folder if (folder / INDEX_FILE).is_file() else None


def _is_unreachable(exc: BaseException) -> bool:
    """Offline mode or no connection (as opposed to an answer from the Hub)."""
    if isinstance(exc, OfflineModeIsEnabled) or isinstance(exc.__cause__, OfflineModeIsEnabled):
        return True
    if isinstance(exc, HfHubHTTPError):
        return False
    # httpx's transport errors; the names are checked so this works whichever httpx the Hub client uses
    return any(cls.__name__ in ("ConnectError", "ConnectTimeout", "TimeoutException", "NetworkError")
               for cls in type(exc).__mro__) or isinstance(exc, (LocalEntryNotFoundError, ConnectionError))


def _worth_retrying(exc: BaseException) -> bool:
    """Transfer problems are retried; answers that will not change (gated, missing, offline) are not."""
    if isinstance(exc, (StudioError, RepositoryNotFoundError, RevisionNotFoundError, EntryNotFoundError,
                        OfflineModeIsEnabled, ValueError)):
        return False
    if isinstance(exc.__cause__, OfflineModeIsEnabled):
        return False
    if isinstance(exc, HfHubHTTPError) and exc.response is not None:
        status = exc.response.status_code
        return status >= 500 or status in (408, 429)
    return True


def _short(exc: BaseException) -> str:
    """An exception on one line, without the Hub's multi-line explanations."""
    text = " ".join(str(exc).split())
    return f"{type(exc).__name__}: {text[:200]}" if text else type(exc).__name__


def _user_error(exc: BaseException, repo_id: str) -> StudioError:
    """One line that says what went wrong and what to do."""
    if isinstance(exc, StudioError):
        return exc
    name = repo_id.rsplit("/", 1)[-1]
    url = f"{constants.ENDPOINT.rstrip('/')}/{repo_id}"
    status = getattr(getattr(exc, "response", None), "status_code", None)
    if isinstance(exc, GatedRepoError):
        return DownloadError(f"{name} is gated: accept its licence at {url}, then run `hf auth login` "
                             "(or set HF_TOKEN) and start again")
    if isinstance(exc, RepositoryNotFoundError):
        return DownloadError(f"{repo_id} was not found on the Hugging Face Hub: check the name (a private "
                             "or gated repository also needs `hf auth login` or HF_TOKEN)")
    if isinstance(exc, HfHubHTTPError) and status in (401, 403):
        return DownloadError(f"the Hugging Face Hub refused access to {name} ({status}): accept its licence at "
                             f"{url} and run `hf auth login` (or set HF_TOKEN) with an account that has access")
    if isinstance(exc, RevisionNotFoundError):
        return DownloadError(f"{repo_id} has no revision by that name on the Hugging Face Hub")
    if isinstance(exc, OfflineModeIsEnabled) or isinstance(exc.__cause__, OfflineModeIsEnabled):
        return DownloadError(f"{name} is not downloaded yet and the Hugging Face Hub is switched off here "
                             "(HF_HUB_OFFLINE=1): start once with internet access and without HF_HUB_OFFLINE, "
                             "or copy the model into the Hugging Face cache")
    if _is_unreachable(exc):
        return DownloadError(f"could not reach the Hugging Face Hub to download {name} ({_short(exc)}): check "
                             "the connection (or HTTPS_PROXY) and start again; finished files are kept")
    if isinstance(exc, HfHubHTTPError):
        return DownloadError(f"the Hugging Face Hub answered {status} while downloading {name}: try again "
                             "later; finished files are kept")
    return DownloadError(f"downloading {name} failed ({_short(exc)}): start again to resume; finished "
                         "files are kept")
