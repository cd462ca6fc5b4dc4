"""A Hugging Face-compatible file server on loopback, serving in-memory repositories to the real `huggingface_hub`
client (HF_ENDPOINT). It answers what the client's download path asks:

- `GET /api/models/{repo}/revision/{rev}?blobs=true`: the commit and every file with its size, git blob id, and
  for large (LFS) files their sha256;
- `HEAD` / `GET /{repo}/resolve/{rev}/{file}`: `X-Repo-Commit`, `ETag` (the sha256 of an LFS file, else the blob
  id) and `Content-Length`; `Range: bytes=N-` answers 206 from byte N;
- a gated repository answers downloads 401 without a token and 403 with a token it did not grant, with the hub's
  `X-Error-Code: GatedRepo`; an unknown revision or file 404 with `RevisionNotFound` / `EntryNotFound`.

Every request is logged (method, repository, file, Range, token). `cut` interrupts transfers: a file listed with
"once" gets half its bytes on its first GET, then the connection closes; with "always" every later GET of it closes
without an answer too, until the entry is removed.
"""

from __future__ import annotations

import hashlib
import json
import re
import socket
import threading
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

LFS_SUFFIXES = (".safetensors",)


def git_blob_id(data: bytes) -> str:
    return hashlib.sha1(b"blob %d\0" % len(data) + data).hexdigest()


@dataclass
class Repository:
    gated: bool = False
    commits: dict[str, dict[str, bytes]] = field(default_factory=dict)
    refs: dict[str, str] = field(default_factory=dict)

    def commit(self, files: dict[str, bytes], ref: str = "main") -> str:
        """Add a commit holding `files` and point `ref` at it; returns the commit id."""
        digest = hashlib.sha1(str(len(self.commits)).encode())
        for name in sorted(files):
            digest.update(name.encode() + hashlib.sha256(files[name]).digest())
        sha = digest.hexdigest()
        self.commits[sha] = dict(files)
        self.refs[ref] = sha
        return sha

    def resolve(self, revision: str) -> str | None:
        return self.refs.get(revision) or (revision if revision in self.commits else None)


@dataclass
class Request:
    method: str
    repository: str
    file: str | None
    range: str | None
    token: str | None


class Hub:
    def __init__(self, repositories: dict[str, Repository], granted: set[str] = frozenset()):
        self.repositories = repositories
        self.granted = set(granted)
        self.requests: list[Request] = []
        self.cut: dict[str, str] = {}
        self._cut_done: set[str] = set()
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _handler(self))
        self._server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)

    def __enter__(self) -> "Hub":
        self._thread.start()
        return self

    def __exit__(self, *exc) -> None:
        self._server.shutdown()
        self._server.server_close()

    def downloads(self, file: str | None = None) -> list[Request]:
        """The GETs of files (of `file` only when given)."""
        with self._lock:
            return [r for r in self.requests if r.method == "GET" and r.file is not None
                    and (file is None or r.file == file)]

    def log(self, request: Request) -> None:
        with self._lock:
            self.requests.append(request)

    def cut_now(self, file: str) -> str | None:
        """How to interrupt this GET of `file`: "half" (send half, then close), "drop" (close at once) or None."""
        with self._lock:
            mode = self.cut.get(file)
            if mode is None:
                return None
            if file not in self._cut_done:
                self._cut_done.add(file)
                return "half"
            return "drop" if mode == "always" else None


_API = re.compile(r"^/api/models/(?P<repo>[^/]+/[^/]+)/revision/(?P<rev>[^/?]+)")
_RESOLVE = re.compile(r"^/(?P<repo>[^/]+/[^/]+)/resolve/(?P<rev>[^/]+)/(?P<file>[^?]+)")


def _handler(hub: Hub):
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def log_message(self, *args) -> None:
            pass

        def do_GET(self) -> None:
            self._answer(body=True)

        def do_HEAD(self) -> None:
            self._answer(body=False)

        def _token(self) -> str | None:
            value = self.headers.get("Authorization", "")
            return value.removeprefix("Bearer ") if value.startswith("Bearer ") else None

        def _error(self, status: int, code: str, message: str, commit: str | None = None) -> None:
            body = json.dumps({"error": message}).encode()
            self.send_response(status)
            self.send_header("X-Error-Code", code)
            self.send_header("X-Error-Message", message)
            if commit:
                self.send_header("X-Repo-Commit", commit)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            if self.command == "GET":
                self.wfile.write(body)

        def _answer(self, body: bool) -> None:
            path = self.path.split("?")[0]
            if match := _API.match(path):
                return self._api(match["repo"], match["rev"])
            if match := _RESOLVE.match(path):
                return self._resolve(match["repo"], match["rev"], match["file"], body)
            self._error(404, "RepoNotFound", f"no route {path}")

        def _api(self, name: str, revision: str) -> None:
            hub.log(Request("API", name, None, None, self._token()))
            repository = hub.repositories.get(name)
            if repository is None:
                return self._error(401, "RepoNotFound", "Repository not found")
            commit = repository.resolve(revision)
            if commit is None:
                return self._error(404, "RevisionNotFound", f"Invalid rev id: {revision}")
            siblings = []
            for file, data in sorted(repository.commits[commit].items()):
                sibling = {"rfilename": file, "size": len(data), "blobId": git_blob_id(data)}
                if file.endswith(LFS_SUFFIXES):
                    sibling["lfs"] = {"size": len(data), "sha256": hashlib.sha256(data).hexdigest(), "pointerSize": 134}
                siblings.append(sibling)
            document = {"id": name, "modelId": name, "sha": commit, "private": False,
                        "gated": "manual" if repository.gated else False, "siblings": siblings}
            payload = json.dumps(document).encode()
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(payload)))
            self.end_headers()
            self.wfile.write(payload)

        def _resolve(self, name: str, revision: str, file: str, body: bool) -> None:
            token = self._token()
            byte_range = self.headers.get("Range")
            hub.log(Request(self.command, name, file, byte_range, token))
            repository = hub.repositories.get(name)
            if repository is None:
                return self._error(401, "RepoNotFound", "Repository not found")
            if repository.gated and token is None:
                return self._error(401, "GatedRepo", f"Access to model {name} is restricted. You must have access to "
                                   "it and be authenticated to access it. Please log in.")
            if repository.gated and token not in hub.granted:
                return self._error(403, "GatedRepo", f"Access to model {name} is restricted and you are not in the "
                                   f"authorized list. Visit {hub.url}/{name} to ask for access.")
            commit = repository.resolve(revision)
            if commit is None:
                return self._error(404, "RevisionNotFound", f"Invalid rev id: {revision}")
            data = repository.commits[commit].get(file)
            if data is None:
                return self._error(404, "EntryNotFound", f"{file} does not exist on {revision}", commit)
            cut = hub.cut_now(file) if body else None
            if cut == "drop":
                self.close_connection = True
                self.connection.shutdown(socket.SHUT_RDWR)
                return
            start = int(byte_range.removeprefix("bytes=").split("-")[0]) if byte_range else 0
            etag = hashlib.sha256(data).hexdigest() if file.endswith(LFS_SUFFIXES) else git_blob_id(data)
            self.send_response(206 if start else 200)
            self.send_header("X-Repo-Commit", commit)
            self.send_header("ETag", f'"{etag}"')
            self.send_header("Accept-Ranges", "bytes")
            self.send_header("Content-Type", "application/octet-stream")
            self.send_header("Content-Length", str(len(data) - start))
            if start:
                self.send_header("Content-Range", f"bytes {start}-{len(data) - 1}/{len(data)}")
            self.end_headers()
            if not body:
                return
            if cut == "half":
                self.wfile.write(data[start:start + (len(data) - start) // 2])
                self.wfile.flush()
                self.close_connection = True
                self.connection.shutdown(socket.SHUT_RDWR)
                return
            self.wfile.write(data[start:])

    return Handler
