"""First-run download of a backbone (studio/engine/backbones/download.py) against a local Hub.

A stdlib HTTP server in a thread answers the calls huggingface_hub makes (model info with file
metadata, HEAD and ranged GET on ``/<repo>/resolve/<revision>/<file>``) for the tiny FLUX pipeline
folder plus files diffusers does not need. The client runs in a subprocess: huggingface_hub reads
``HF_ENDPOINT`` / ``HF_HUB_OFFLINE`` when it is imported, and this test process is offline.
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlsplit

import pytest
from huggingface_hub.hf_api import RepoSibling

from studio.engine.backbones.download import DownloadProgress, select_files

REPO = "acme/tiny-flux"
COMMIT = "0123456789abcdef0123456789abcdef01234567"
ROOT = Path(__file__).resolve().parents[1]
# In the repository but not needed by from_pretrained: never requested.
EXTRA = {
    "README.md": b"# tiny\n",
    "flux1-dev.safetensors": b"single-file checkpoint" * 100,
    "ae.safetensors": b"single-file autoencoder" * 50,
    "text_encoders/t5xxl_fp16.safetensors": b"ComfyUI text encoder" * 50,
    "transformer/diffusion_pytorch_model.bin": b"pickle copy" * 100,
    "vae/diffusion_flax_model.msgpack": b"flax copy" * 100,
}
LARGEST = "transformer/diffusion_pytorch_model.safetensors"

CLIENT = r"""
import json, os, sys
from studio import diskspace
from studio.engine.backbones.download import ensure_downloaded

mode, repo = sys.argv[1], sys.argv[2]
if os.environ.get("FAKE_FREE_BYTES"):  # a nearly full disk
    diskspace.free_bytes = lambda path: int(os.environ["FAKE_FREE_BYTES"])
events, result = [], {}

def on_progress(p):
    events.append({"done": p.done_bytes, "total": p.total_bytes, "file": p.current_file,
                   "files_done": p.files_done, "files_total": p.files_total, "text": p.describe()})

try:
    if mode == "load":
        from studio.engine.backbones import load_backbone
        backbone = load_backbone(repo, on_download=on_progress)
        result.update(source=backbone.source, pipeline=type(backbone.pipe).__name__,
                      folder=str(backbone.pipe.name_or_path))
    else:
        result["folder"] = str(ensure_downloaded(repo, on_progress=on_progress, interval_s=0, retry_wait_s=0.1))
except Exception as exc:
    result.update(error=str(exc), type=type(exc).__name__)
result["events"] = events
print(json.dumps(result))
"""


def _lfs(name: str) -> bool:
    return name.endswith((".safetensors", ".bin", ".msgpack"))


class LocalHub:
    """Serves ``files`` as the repository ``REPO`` at commit ``COMMIT`` and records every request."""

    def __init__(self, files: dict[str, bytes]):
        self.files = files
        self.gated = False
        self.cut_once: set[str] = set()  # files whose first GET stops half-way
        self.requests: list[tuple[str, str, str | None]] = []  # (method, file or path, Range header)
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_GET(self):
                hub.answer(self, head=False)

            def do_HEAD(self):
                hub.answer(self, head=True)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.server.server_address[1]}"

    def etag(self, name: str) -> str:
        data = self.files[name]
        if _lfs(name):
            return hashlib.sha256(data).hexdigest()
        return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()  # git's blob id

    def siblings(self) -> list[dict]:
        return [{"rfilename": name, "size": len(data), "blobId": self.etag(name) if not _lfs(name) else "0" * 40,
                 **({"lfs": {"size": len(data), "sha256": self.etag(name), "pointerSize": 134}}
                    if _lfs(name) else {})}
                for name, data in self.files.items()]

    def answer(self, handler: BaseHTTPRequestHandler, head: bool) -> None:
        path = unquote(urlsplit(handler.path).path)
        info_prefix, resolve_prefix = f"/api/models/{REPO}", f"/{REPO}/resolve/"
        if path in (info_prefix, f"{info_prefix}/revision/main"):
            self.requests.append((handler.command, path, None))
            body = json.dumps({"id": REPO, "modelId": REPO, "sha": COMMIT, "private": False,
                               "gated": "manual" if self.gated else False, "siblings": self.siblings()}).encode()
            return self.send(handler, 200, {"Content-Type": "application/json"}, body, head)
        if path.startswith("/api/models/") or not path.startswith(resolve_prefix):
            self.requests.append((handler.command, path, None))
            return self.send(handler, 404, {"X-Error-Code": "RepoNotFound"}, b"Repository not found", head)
        revision, _, name = path[len(resolve_prefix):].partition("/")
        self.requests.append((handler.command, name, handler.headers.get("Range")))
        if self.gated:
            return self.send(handler, 401, {"X-Error-Code": "GatedRepo", "X-Error-Message": "Access restricted"},
                             b"gated", head)
        if revision not in ("main", COMMIT) or name not in self.files:
            return self.send(handler, 404, {"X-Error-Code": "EntryNotFound", "X-Repo-Commit": COMMIT}, b"", head)
        data, start, status = self.files[name], 0, 200
        headers = {"X-Repo-Commit": COMMIT, "Accept-Ranges": "bytes",
                   "Content-Type": "application/octet-stream"}
        if _lfs(name):
            headers.update({"X-Linked-Etag": f'"{self.etag(name)}"', "X-Linked-Size": str(len(data)),
                            "ETag": '"pointer"'})
        else:
            headers["ETag"] = f'"{self.etag(name)}"'
        range_header = handler.headers.get("Range")
        if range_header and not head:  # huggingface_hub resumes with "bytes=<start>-"
            start, status = int(range_header.split("=")[1].split("-")[0]), 206
            headers["Content-Range"] = f"bytes {start}-{len(data) - 1}/{len(data)}"
        body = data[start:]
        if not head and name in self.cut_once:  # promise the whole file, send half, hang up
            self.cut_once.discard(name)
            handler.send_response(status)
            for key, value in {**headers, "Content-Length": str(len(body))}.items():
                handler.send_header(key, value)
            handler.end_headers()
            handler.wfile.write(body[: len(body) // 2])
            handler.wfile.flush()
            handler.close_connection = True
            return None
        return self.send(handler, status, headers, body, head)

    @staticmethod
    def send(handler, status: int, headers: dict, body: bytes, head: bool) -> None:
        handler.send_response(status)
        for key, value in {**headers, "Content-Length": str(len(body))}.items():
            handler.send_header(key, value)
        handler.end_headers()
        if not head:
            handler.wfile.write(body)

    def downloaded(self) -> list[str]:
        """Files fetched with GET (HEAD only asks for the metadata)."""
        return [name for method, name, _ in self.requests if method == "GET" and not name.startswith("/")]


@pytest.fixture(scope="module")
def pipeline_files(tiny_folder) -> dict[str, bytes]:
    """The tiny FLUX pipeline folder, file by file (what from_pretrained needs)."""
    return {p.relative_to(tiny_folder).as_posix(): p.read_bytes()
            for p in sorted(tiny_folder.rglob("*")) if p.is_file() and p.name != "tiny.json"}


@pytest.fixture
def hub(pipeline_files):
    server = LocalHub({**pipeline_files, **EXTRA})
    server.thread.start()
    yield server
    server.server.shutdown()
    server.server.server_close()


def run_client(hub: LocalHub, hf_home: Path, mode: str = "ensure", repo: str = REPO, **env) -> dict:
    environ = {**os.environ, "HF_ENDPOINT": hub.url, "HF_HUB_OFFLINE": "0", "HF_HOME": str(hf_home),
               "HF_HUB_DISABLE_XET": "1", "HF_HUB_ETAG_TIMEOUT": "5", "NO_PROXY": "127.0.0.1", **env}
    environ.pop("HF_TOKEN", None)
    done = subprocess.run([sys.executable, "-c", CLIENT, mode, repo], cwd=ROOT, env=environ,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    return json.loads(done.stdout.strip().splitlines()[-1])


def cached_blobs(hf_home: Path) -> list[str]:
    return [p.name for p in (hf_home / "hub").rglob("blobs/*") if p.is_file()]


def test_full_download_reports_progress_and_leaves_a_complete_folder(hub, pipeline_files, tmp_path):
    result = run_client(hub, tmp_path / "hf")
    assert "error" not in result, result
    folder = Path(result["folder"])
    assert folder.name == COMMIT
    for name, data in pipeline_files.items():
        assert (folder / name).read_bytes() == data, name
    assert set(hub.downloaded()) == set(pipeline_files)  # the extra files were never transferred
    assert not set(EXTRA) & {p.relative_to(folder).as_posix() for p in folder.rglob("*")}

    events = result["events"]
    total = sum(len(d) for d in pipeline_files.values())
    assert {e["total"] for e in events} == {total}
    done = [e["done"] for e in events]
    assert done == sorted(done) and done[-1] == total
    assert events[-1]["files_done"] == events[-1]["files_total"] == len(pipeline_files)
    assert {e["file"] for e in events if e["file"]} == set(pipeline_files) - {"model_index.json"}
    assert events[-1]["text"].startswith("downloaded tiny-flux (")
    assert any(e["text"].startswith("downloading tiny-flux: ") and LARGEST in e["text"] for e in events)

    # Everything is cached now: a second call transfers nothing and reports nothing.
    hub.requests.clear()
    again = run_client(hub, tmp_path / "hf")
    assert again["folder"] == result["folder"] and again["events"] == []
    assert hub.downloaded() == []
    # Offline, the cached snapshot is used as it is.
    offline = run_client(hub, tmp_path / "hf", HF_HUB_OFFLINE="1")
    assert offline["folder"] == result["folder"], offline


def test_a_cut_transfer_resumes_with_a_range_request(hub, tmp_path):
    # huggingface_hub writes what it receives in 10 MiB pieces, so resuming needs a file larger than that.
    big = "transformer/extra-weights.safetensors"
    hub.files[big] = bytes(range(256)) * (24 * 4096)  # 24 MiB
    hub.cut_once.add(big)
    result = run_client(hub, tmp_path / "hf")
    assert "error" not in result, result
    assert (Path(result["folder"]) / big).read_bytes() == hub.files[big]
    gets = [rng for method, name, rng in hub.requests if method == "GET" and name == big]
    assert len(gets) == 2 and gets[0] is None
    resumed_at = int(gets[1].removeprefix("bytes=").removesuffix("-"))
    assert 0 < resumed_at <= len(hub.files[big]) // 2  # it continued from what it had, not from the start
    assert result["events"][-1]["done"] == result["events"][-1]["total"]


def test_not_enough_disk_is_refused_before_any_weights_are_downloaded(hub, tmp_path):
    result = run_client(hub, tmp_path / "hf", FAKE_FREE_BYTES="1000000")
    assert result["type"] == "DiskFullError", result
    message = result["error"]
    assert "\n" not in message
    assert message.startswith("not enough disk space to download tiny-flux: 2.8 MB still to download, "
                              "1.0 MB free on "), message
    assert "HF_HOME" in message
    assert hub.downloaded() == ["model_index.json"]  # only the 1 kB index that names the components
    assert len(cached_blobs(tmp_path / "hf")) == 1
    assert result["events"] == []


def test_a_gated_repository_says_accept_the_licence_and_log_in(hub, tmp_path):
    hub.gated = True
    result = run_client(hub, tmp_path / "hf")
    assert result["type"] == "DownloadError", result
    assert result["error"] == (f"tiny-flux is gated: accept its licence at {hub.url}/{REPO}, then run "
                               "`hf auth login` (or set HF_TOKEN) and start again")
    assert cached_blobs(tmp_path / "hf") == []


def test_unknown_repository_and_offline_without_a_copy(hub, tmp_path):
    missing = run_client(hub, tmp_path / "hf", repo="acme/no-such-model")
    assert missing["error"].startswith("acme/no-such-model was not found on the Hugging Face Hub: check the name")
    offline = run_client(hub, tmp_path / "hf", HF_HUB_OFFLINE="1")
    assert offline["type"] == "DownloadError"
    assert offline["error"].startswith("tiny-flux is not downloaded yet and the Hugging Face Hub is switched off "
                                       "here (HF_HUB_OFFLINE=1)"), offline
    assert hub.downloaded() == []


def test_load_backbone_downloads_a_hub_id_then_loads_the_snapshot(hub, tmp_path):
    result = run_client(hub, tmp_path / "hf", mode="load")
    assert "error" not in result, result
    assert result["pipeline"] == "FluxPipeline"
    assert result["source"] == REPO  # templates record the hub id, not the cache folder
    assert COMMIT in result["folder"]
    assert result["events"] and result["events"][-1]["text"].startswith("downloaded tiny-flux")


def test_progress_lines_and_the_job_message():
    from studio.jobs.worker import download_message

    running = DownloadProgress("black-forest-labs/FLUX.1-dev", 33_900_000_000, 12_300_000_000, 20, 12,
                               "transformer/diffusion_pytorch_model-00002-of-00003.safetensors",
                               85_000_000, 250.0)
    assert running.describe() == ("downloading FLUX.1-dev: 12.3 of 33.9 GB, 85 MB/s, ETA 4 min "
                                  "(transformer/diffusion_pytorch_model-00002-of-00003.safetensors)")
    assert download_message(running) == running.describe()
    starting = DownloadProgress("black-forest-labs/FLUX.1-dev", 33_900_000_000, 0, 20, 0, "model_index.json")
    assert starting.describe() == "downloading FLUX.1-dev: 0.0 of 33.9 GB (model_index.json)"
    done = DownloadProgress("black-forest-labs/FLUX.1-dev", 33_900_000_000, 33_900_000_000, 20, 20)
    assert download_message(done) == "downloaded FLUX.1-dev (33.9 GB, 20 files); loading the model"


def test_only_what_diffusers_loads_is_chosen():
    index = {"_class_name": "StableDiffusion3Pipeline", "transformer": ["diffusers", "SD3Transformer2DModel"],
             "text_encoder": ["transformers", "CLIPTextModelWithProjection"], "tokenizer": ["transformers", "x"],
             "image_encoder": [None, None], "vae": ["diffusers", "AutoencoderKL"]}
    names = ["model_index.json", "README.md", "sd3.5_large.safetensors", "text_encoders/t5xxl_fp16.safetensors",
             "transformer/config.json", "transformer/diffusion_pytorch_model.safetensors.index.json",
             "transformer/diffusion_pytorch_model-00001-of-00002.safetensors",
             "transformer/diffusion_pytorch_model-00002-of-00002.safetensors",
             "transformer/diffusion_pytorch_model.fp16-00001-of-00001.safetensors",
             "transformer/diffusion_pytorch_model.safetensors.index.fp16.json",
             "text_encoder/model.safetensors", "text_encoder/model.fp16.safetensors",
             "text_encoder/pytorch_model.bin", "text_encoder/model.onnx", "text_encoder/flax_model.msgpack",
             "tokenizer/vocab.json", "tokenizer/merges.txt", "image_encoder/config.json",
             "vae/config.json", "vae/diffusion_pytorch_model.bin"]  # a component with pickled weights only
    chosen = [s.rfilename for s in select_files([RepoSibling(rfilename=n, size=1) for n in names], index)]
    assert chosen == ["model_index.json", "transformer/config.json",
                      "transformer/diffusion_pytorch_model.safetensors.index.json",
                      "transformer/diffusion_pytorch_model-00001-of-00002.safetensors",
                      "transformer/diffusion_pytorch_model-00002-of-00002.safetensors",
                      "text_encoder/model.safetensors", "tokenizer/vocab.json", "tokenizer/merges.txt",
                      "vae/config.json", "vae/diffusion_pytorch_model.bin"]
