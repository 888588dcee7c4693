"""Checkpoints named by Hugging Face repo id, ``ORG/NAME[@REVISION]``.

The small files (config, index, tokenizer) come through ``huggingface_hub``
into its cache, as ``mlx_lm.load`` fetches them. The weights are read by the
byte range: from the Hugging Face cache when a shard is there whole (``hf
download``), else fetched from the hub by ``Range`` requests into a cache of
expertmesh's own beside it (``$EXPERTMESH_CACHE``, default
``$HF_HOME/expertmesh``), where every piece is a file named by its byte range
and written whole or not at all, so a node fetches only what it serves, once.

    $HF_HOME/expertmesh/models--ORG--NAME/
        pieces/<blob etag>/<start>-<end>     bytes [start, end) of that blob
        commits/<commit>.json                the shards' etags and sizes (for offline use)
        commits/<commit>.<key>               memos (the weights' identity)
        dense/<commit>-<hash>/               the router's dense tensors, one file
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import struct
from concurrent.futures import ThreadPoolExecutor, as_completed, wait
from pathlib import Path

from .errors import ModelError
from .files import INDEX, LocalFiles, Range
from .pieces import PieceCache, atomic, write_atomic

logger = logging.getLogger(__name__)

_REPO = re.compile(r"^[A-Za-z0-9][\w.-]{0,95}/[A-Za-z0-9][\w.-]{0,95}(@[\w./-]{1,200})?$")
_COMMIT = re.compile(r"^[0-9a-f]{40}$")
_ETAG = re.compile(r"^[0-9A-Za-z]{8,128}$")
_FETCHERS = 8         # parallel range requests
_TIMEOUT = 60.0       # seconds a range request may stall
_GAP = 256             # sampled blocks closer than this come in one request (a tensor's end, the next one's start)


def small_patterns() -> list[str]:
    """What ``mlx_lm.load`` downloads, less the weights: config, index, tokenizer."""
    from mlx_lm.utils import DEFAULT_ALLOW_PATTERNS

    return [p for p in DEFAULT_ALLOW_PATTERNS if "safetensors" not in p] + [INDEX]


def own_cache() -> Path:
    from huggingface_hub import constants

    return Path(os.environ.get("EXPERTMESH_CACHE") or Path(constants.HF_HOME) / "expertmesh").expanduser()


def parse_repo(model: str) -> tuple[str, str | None] | None:
    """``(repo_id, revision)`` when ``model`` reads as ``ORG/NAME[@REVISION]``, else None."""
    if not _REPO.match(model) or ".." in model:
        return None
    repo, _, revision = model.partition("@")
    return repo, revision or None


def open_files(model) -> LocalFiles:
    """The files of ``model``: a directory (a Hugging Face cache snapshot too) or a repo id.

    Raises:
        ModelError: neither, or the repo cannot be resolved.
    """
    path = Path(model).expanduser()
    if path.is_dir():
        root = path.resolve()
        if root.parent.name == "snapshots" and root.parent.parent.name.startswith("models--"):
            return LocalFiles(root, root.parent.parent, "the model's cache folder")  # symlinks into its blobs/
        return LocalFiles(root)
    repo = parse_repo(str(model))
    if repo is None:
        raise ModelError(f"model directory {model} does not exist (nor is it a Hugging Face repo id ORG/NAME)")
    return HubFiles(*repo)


def _why(e: BaseException) -> str:
    """One short line for a huggingface_hub or httpx failure."""
    from huggingface_hub.errors import (LocalEntryNotFoundError, RepositoryNotFoundError,
                                        RevisionNotFoundError)

    if isinstance(e, RepositoryNotFoundError):
        return "the hub has no such repo (a private or gated one needs HF_TOKEN)"
    if isinstance(e, RevisionNotFoundError):
        return "the repo has no such revision"
    if isinstance(e, LocalEntryNotFoundError) and e.__cause__ is not None:
        return f"{_why(e.__cause__)}, and the Hugging Face cache holds no copy"
    response = getattr(e, "response", None)
    if response is not None and getattr(response, "status_code", None):
        return f"the hub answered {response.status_code} {response.reason_phrase} for {response.request.url}"
    text = " ".join(str(e).split())
    return f"{type(e).__name__}: {text if len(text) < 200 else text[:197] + '...'}"


class HubFiles(LocalFiles):
    """A repo's files: small ones from its snapshot in the Hugging Face cache,
    shards from there when whole, else by the byte range from the hub."""

    def __init__(self, repo_id: str, revision: str | None = None):
        from huggingface_hub import snapshot_download

        logging.getLogger("httpx2").setLevel(logging.WARNING)  # not a line per request
        self.repo_id, self.name = repo_id, repo_id.split("/")[-1]
        try:
            snapshot = Path(snapshot_download(repo_id, revision=revision, allow_patterns=small_patterns()))
        except Exception as e:  # huggingface_hub's errors, httpx's, OSError: all one line
            raise ModelError(f"cannot fetch {repo_id}{'@' + revision if revision else ''}: {_why(e)}") from None
        self.commit = snapshot.name
        if not _COMMIT.match(self.commit):
            raise ModelError(f"{repo_id}: the hub named revision {self.commit!r}, not a commit hash")
        super().__init__(snapshot.resolve(), snapshot.parent.parent.resolve(), "the model's cache folder")
        self.own = own_cache() / snapshot.parent.parent.name
        self.shards = self._shards()
        self.pieces = PieceCache(self.own / "pieces")
        self._pool = ThreadPoolExecutor(_FETCHERS, thread_name_prefix="hub-fetch")

    # --- what the repo holds ------------------------------------------------------
    def _shards(self) -> dict[str, tuple[str, int]]:
        """safetensors file -> (etag, size), from the hub's tree (remembered for offline use)."""
        from huggingface_hub import HfApi, constants

        memo = self.own / "commits" / f"{self.commit}.json"
        if not constants.HF_HUB_OFFLINE:
            try:
                tree = HfApi().list_repo_tree(self.repo_id, revision=self.commit, recursive=True)
                shards = {f.path: ((f.lfs.sha256 if f.lfs else f.blob_id), f.size) for f in tree
                          if getattr(f, "size", None) is not None and f.path.endswith(".safetensors")}
                write_atomic(memo, json.dumps(shards).encode())
                return shards
            except Exception as e:
                if not memo.is_file():
                    raise ModelError(f"cannot list the files of {self.repo_id}: {_why(e)}") from None
                logger.warning("cannot reach the hub for %s (%s); using what was listed before", self.repo_id, e)
        try:
            return {k: (str(v[0]), int(v[1])) for k, v in json.loads(memo.read_text()).items()}
        except (OSError, ValueError, TypeError, IndexError, AttributeError):
            raise ModelError(f"HF_HUB_OFFLINE is set and the shards of {self.repo_id} were never listed "
                             f"here: run once online (or hf download {self.repo_id})") from None

    def _shard(self, name: str) -> tuple[str, int]:
        if name.startswith("/") or ".." in Path(name).parts or "\\" in name:
            raise ModelError(f"{name!r} lies outside the model's cache folder {self.boundary}")
        if name not in self.shards:
            raise ModelError(f"weight file {name!r} listed in the index is not in {self.repo_id}")
        etag, size = self.shards[name]
        if not _ETAG.match(etag):
            raise ModelError(f"{self.repo_id}: the hub gave {name} an etag {etag!r} that is not a content hash")
        return etag, size

    def _whole(self, name: str) -> bool:
        """Whether the Hugging Face cache holds shard ``name`` whole (its blob, of the right size)."""
        etag, size = self._shard(name)
        file = self.inside(name) if (self.root / name).exists() else None
        return file is not None and file.name == etag and file.stat().st_size == size

    def exists(self, name: str) -> bool:
        if name.endswith(".safetensors"):
            self._shard(name)
            return True
        return super().exists(name)

    def safetensors(self) -> list[str]:
        return sorted(n for n in self.shards if "/" not in n)

    # --- reading --------------------------------------------------------------------
    def read(self, name: str, start: int, count: int) -> bytes:
        if self._whole(name):
            return super().read(name, start, count)
        etag, size = self._shard(name)
        if start + count > size:
            raise ModelError(f"{self.repo_id}/{name} has {size} bytes, not the {start + count} its header needs")
        return self.pieces.get(etag, start, count, self._fetcher(name))

    def read_many(self, ranges: list[Range]) -> list[bytes]:
        """Small blocks (the identity's samples) from the caches where they are, else fetched
        without caching them: blocks less than ``_GAP`` apart in one request, requests in parallel."""
        out: dict[int, bytes] = {}
        spans: list[tuple[str, int, int, list[int]]] = []  # (file, start, end, indices of its blocks)
        for i in sorted(range(len(ranges)), key=lambda i: ranges[i][:2]):
            name, start, count = ranges[i]
            if self._whole(name):
                out[i] = super().read(name, start, count)
            elif (cached := self.pieces.peek(self._shard(name)[0], start, count)) is not None:
                out[i] = cached
            elif spans and spans[-1][0] == name and start - spans[-1][2] <= _GAP:
                spans[-1] = (name, spans[-1][1], max(spans[-1][2], start + count), spans[-1][3] + [i])
            else:
                spans.append((name, start, start + count, [i]))

        def one(span):
            name, start, end, blocks = span
            data = self._fetch(name, start, end)
            return {i: data[ranges[i][1] - start:ranges[i][1] - start + ranges[i][2]] for i in blocks}

        for got in self._pool.map(one, spans):
            out.update(got)
        return [out[i] for i in range(len(ranges))]

    def to_fetch(self, ranges: list[Range]) -> int:
        """Bytes of ``ranges`` neither cache holds."""
        return sum(b - a for name, start, count in ranges if not self._whole(name)
                   for a, b in self.pieces.missing(self._shard(name)[0], start, count))

    def prefetch(self, ranges: list[Range]) -> None:
        from .progress import Progress

        todo = [(name, a, b) for name, start, count in ranges if not self._whole(name)
                for a, b in self.pieces.missing(self._shard(name)[0], start, count)]
        total = sum(b - a for _, a, b in todo)
        if not todo:
            return
        done = 0
        with Progress("fetching") as progress:
            progress.update(self.repo_id, 0, total)

            def one(job):
                name, a, b = job
                self.pieces.get(self._shard(name)[0], a, b - a, self._fetcher(name))
                return b - a

            jobs = [self._pool.submit(one, job) for job in todo]
            try:
                for job in as_completed(jobs):
                    done += job.result()
                    progress.update(self.repo_id, done, total)
            finally:  # on a failure: nothing more starts, and nothing still runs when we return
                for job in jobs:
                    job.cancel()
                wait(jobs)

    def _fetcher(self, name: str):
        return lambda start, end, sink: self._fetch(name, start, end, sink)

    def _fetch(self, name: str, start: int, end: int, sink=None) -> bytes | None:
        """Bytes ``[start, end)`` of ``name`` by one ``Range`` request, into ``sink`` (a file) or returned.

        Raises:
            ModelError: in one line, on any HTTP or connection failure or a short answer.
        """
        import httpx2
        from huggingface_hub import constants, hf_hub_url
        from huggingface_hub.utils import build_hf_headers, get_session, hf_raise_for_status

        if constants.HF_HUB_OFFLINE:
            raise ModelError(f"HF_HUB_OFFLINE is set and bytes {start}-{end} of {self.repo_id}/{name} are not in "
                             f"the cache (hf download {self.repo_id} fetches everything)")
        url = hf_hub_url(self.repo_id, name, revision=self.commit)
        headers = {**build_hf_headers(), "Range": f"bytes={start}-{end - 1}", "Accept-Encoding": "identity"}
        chunks, got = [], 0
        try:
            with get_session().stream("GET", url, headers=headers, timeout=httpx2.Timeout(_TIMEOUT, connect=10)) as r:
                hf_raise_for_status(r)
                if r.status_code != 206:
                    raise ModelError(f"the hub answered {r.status_code}, not 206, to a range request")
                for chunk in r.iter_bytes(1 << 20):
                    got += len(chunk)
                    if got > end - start:
                        break
                    sink.write(chunk) if sink is not None else chunks.append(chunk)
        except ModelError as e:
            raise ModelError(f"fetching bytes {start}-{end} of {self.repo_id}/{name}: {e}") from None
        except Exception as e:  # httpx's errors, huggingface_hub's HTTP errors, OSError
            raise ModelError(f"fetching bytes {start}-{end} of {self.repo_id}/{name} failed: {_why(e)}") from None
        if got != end - start:
            raise ModelError(f"fetching bytes {start}-{end} of {self.repo_id}/{name}: the hub sent {got} bytes, "
                             f"not {end - start}")
        return None if sink is not None else b"".join(chunks)

    # --- derived files ------------------------------------------------------------------
    def memo(self, key: str, compute):
        """``compute()``, remembered per commit (a commit's bytes never change)."""
        file = self.own / "commits" / f"{self.commit}.{key}"
        try:
            value = file.read_text()
            if re.fullmatch(r"[0-9a-f.]{1,64}", value):
                return value
        except OSError:
            pass
        value = compute()
        write_atomic(file, value.encode())
        return value

    def dense_dir(self, checkpoint, is_expert) -> Path:
        """The snapshot when every shard is whole in it; else a directory of the
        small files and one ``model.safetensors`` of the dense tensors only."""
        tensors = checkpoint.tensors
        if all(self._whole(t.file) for t in tensors.values()):
            return self.root
        dense = sorted(n for n in tensors if not is_expert(n))
        tag = hashlib.sha256("\n".join(dense).encode()).hexdigest()[:12]
        view = self.own / "dense" / f"{self.commit}-{tag}"
        weights = view / "model.safetensors"
        if weights.is_file():
            return view
        self.prefetch(checkpoint.ranges((n, None) for n in dense))
        view.mkdir(parents=True, exist_ok=True)
        for file in self.root.iterdir():
            if file.name != INDEX and not file.name.endswith(".safetensors") and file.is_file():
                write_atomic(view / file.name, self.inside(file.name).read_bytes())
        header, offset = {"__metadata__": {"format": "mlx"}}, 0
        for n in dense:
            t = tensors[n]
            header[n] = {"dtype": t.dtype, "shape": list(t.shape), "data_offsets": [offset, offset + t.nbytes]}
            offset += t.nbytes
        raw = json.dumps(header).encode()
        raw += b" " * (-len(raw) % 8)
        with atomic(weights) as f:
            f.write(struct.pack("<Q", len(raw)) + raw)
            for n in dense:
                f.write(self.read(tensors[n].file, *tensors[n].rows(None)))
        return view
