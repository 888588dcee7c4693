"""A Hugging Face hub on loopback, serving checkpoint directories as repos.

It answers what ``huggingface_hub`` asks (revision info, the file tree,
``HEAD``/``GET`` on ``/{repo}/resolve/{rev}/{file}`` with its ``X-Repo-Commit``,
``ETag``, ``X-Linked-Etag``/``X-Linked-Size`` headers, single ``Range``
requests), counts the body bytes it serves per client (the bearer token each
process sends: ``HF_TOKEN``) and can be told to fail: 404, 500, or a
connection cut half way through a file.
"""

from __future__ import annotations

import collections
import hashlib
import json
import re
import threading
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlparse


class Repo:
    def __init__(self, path: Path):
        self.files = {p.relative_to(path).as_posix(): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}
        self.commit = hashlib.sha1(b"".join(hashlib.sha1(d).digest() for d in self.files.values())).hexdigest()

    def lfs(self, name: str) -> bool:
        return name.endswith(".safetensors")

    def etag(self, name: str) -> str:
        data = self.files[name]
        return hashlib.sha256(data).hexdigest() if self.lfs(name) else hashlib.sha1(data).hexdigest()

    def tree(self) -> list[dict]:
        out = []
        for name, data in self.files.items():
            entry = {"type": "file", "path": name, "size": len(data), "oid": hashlib.sha1(data).hexdigest()}
            if self.lfs(name):
                entry["lfs"] = {"oid": self.etag(name), "size": len(data), "pointerSize": 134}
            out.append(entry)
        return out


class FakeHub:
    """``with FakeHub({"org/name": dir}) as hub``: ``hub.url`` is its HF_ENDPOINT."""

    def __init__(self, repos: dict[str, Path]):
        self.repos = {rid: Repo(p) for rid, p in repos.items()}
        self.served: collections.Counter = collections.Counter()     # client -> body bytes
        self.by_file: collections.Counter = collections.Counter()    # (client, file) -> body bytes
        # file name (or "api") -> "404" | "500" | "cut" (every answer) | "cut-data" (bodies over 4 KB)
        self.faults: dict[str, str] = {}
        self.lock = threading.Lock()
        hub = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.1"

            def log_message(self, *args):
                pass

            def do_HEAD(self):
                hub._handle(self, body=False)

            def do_GET(self):
                hub._handle(self, body=True)

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_port}"

    def __enter__(self) -> "FakeHub":
        threading.Thread(target=self.server.serve_forever, daemon=True).start()
        return self

    def __exit__(self, *exc) -> None:
        self.server.shutdown()
        self.server.server_close()

    def env(self, home: Path, client: str) -> dict[str, str]:
        """The environment a process of ``client`` talks to this hub with, caching under ``home``."""
        return {"HF_ENDPOINT": self.url, "HF_HOME": str(home), "HF_TOKEN": client,
                "HF_HUB_DISABLE_TELEMETRY": "1", "HF_HUB_DISABLE_XET": "1", "HF_HUB_ETAG_TIMEOUT": "5"}

    # --- requests ---------------------------------------------------------------------
    def _handle(self, h: BaseHTTPRequestHandler, body: bool) -> None:
        path = unquote(urlparse(h.path).path)
        client = (h.headers.get("Authorization") or "anonymous").removeprefix("Bearer ")
        if m := re.fullmatch(r"/api/models/([^/]+/[^/]+)/(revision|tree)/([^/]+)(/.*)?", path):
            repo = self.repos.get(m[1])
            if self.faults.get("api"):
                return self._fail(h, self.faults["api"], repo, b"")
            if repo is None:
                return self._send(h, 404, b'{"error":"Repository not found"}', {"X-Error-Code": "RepoNotFound"},
                                  body, client)
            if m[3] not in ("main", repo.commit):
                return self._send(h, 404, b'{"error":"Revision not found"}', {"X-Error-Code": "RevisionNotFound"},
                                  body, client)
            info = repo.tree() if m[2] == "tree" else {
                "id": m[1], "_id": m[1], "sha": repo.commit, "private": False,
                "siblings": [{"rfilename": f} for f in repo.files]}
            return self._send(h, 200, json.dumps(info).encode(), {"Content-Type": "application/json"}, body, client)
        m = re.fullmatch(r"/([^/]+/[^/]+)/resolve/([^/]+)/(.+)", path)
        repo = self.repos.get(m[1]) if m else None
        if repo is None:
            return self._send(h, 404, b"Repository not found", {"X-Error-Code": "RepoNotFound"}, body)
        if m[2] not in ("main", repo.commit) or m[3] not in repo.files:
            return self._send(h, 404, b"Entry not found", {"X-Error-Code": "EntryNotFound",
                                                             "X-Repo-Commit": repo.commit}, body)
        name, data = m[3], repo.files[m[3]]
        headers = {"X-Repo-Commit": repo.commit, "ETag": f'"{repo.etag(name)}"', "Accept-Ranges": "bytes"}
        if repo.lfs(name):
            headers.update({"X-Linked-Etag": f'"{repo.etag(name)}"', "X-Linked-Size": str(len(data))})
        status = 200
        if r := re.fullmatch(r"bytes=(\d+)-(\d*)", h.headers.get("Range", "")):
            start, end = int(r[1]), min(int(r[2]) + 1 if r[2] else len(data), len(data))
            headers["Content-Range"] = f"bytes {start}-{end - 1}/{len(data)}"
            data, status = data[start:end], 206
        fault = self.faults.get(name)
        if body and fault and (fault != "cut-data" or len(data) > 4096):
            return self._fail(h, fault.removesuffix("-data"), repo, data, headers, client, name)
        self._send(h, status, data, headers, body, client, name)

    def _fail(self, h, fault: str, repo, data: bytes, headers=None, client="", name="") -> None:
        if fault == "cut":  # promise the whole body, send half, hang up
            h.send_response(206 if "Content-Range" in (headers or {}) else 200)
            for k, v in (headers or {}).items():
                h.send_header(k, v)
            h.send_header("Content-Length", str(len(data)))
            h.end_headers()
            h.wfile.write(data[:len(data) // 2])
            h.wfile.flush()
            h.close_connection = True
            self._count(client, name, len(data) // 2)
            return
        extra = {"X-Repo-Commit": repo.commit} if repo else {}
        self._send(h, int(fault), b"injected failure", extra)

    def _send(self, h, status: int, data: bytes, headers: dict, body: bool = True, client: str = "",
              name: str = "") -> None:
        h.send_response(status)
        for k, v in headers.items():
            h.send_header(k, v)
        h.send_header("Content-Length", str(len(data)))
        h.end_headers()
        if body:
            h.wfile.write(data)
            self._count(client, name, len(data))

    def _count(self, client: str, name: str, n: int) -> None:
        with self.lock:
            self.served[client] += n
            self.by_file[client, name] += n
