"""Result images kept: each downloaded at once (Modellix's URLs expire) and stored under KLING_ARCHIVE.

No Celery and no database here. The caller (the delivery of a job's end)
decides when to archive and what a failure means for the job; this module
downloads one image, checks it, stores it, and says whether trying again
could help.

Where (`KLING_ARCHIVE`, parsed by `ArchiveSpec`):
- `file:///absolute/dir`: a folder (the embedded default, `$KLING_HOME/results`);
- `s3://bucket/prefix`: any S3-compatible store, reached with boto3, which reads the
  endpoint and the keys from the standard AWS environment (`AWS_ENDPOINT_URL`,
  `AWS_ACCESS_KEY_ID`, `AWS_SECRET_ACCESS_KEY`, `AWS_DEFAULT_REGION`, ...);
- `off`: nothing is kept (`open_archive` returns None).

Keys are `<prefix>/<job_id>/<index>.<ext>`. The content type and the extension
come from the image's first bytes (`sniff`), never from the server's headers.
Storing again under a key replaces the whole file or nothing: the folder
backend writes a temporary file beside the target and renames it over it; an
S3 PUT is atomic per key. So archiving a job twice leaves one copy, never a
torn one.

    ArchiveError(reason, message, retryable)   str(exc) starts with the reason
      expired       the image URL answers 403, 404 or 410: it is gone      not retryable
      http_<n>      any other 4xx from the image host                      not retryable
      unavailable   408, 425, 429 or 5xx from the image host               retryable
      network       no answer, a broken transfer, or slower than allowed   retryable
      too_large     more than max_bytes                                    not retryable
      not_image     neither PNG, JPEG nor WebP                             not retryable
      bad_url       not an http(s) URL, or too many redirects              not retryable
      bad_key       a job id or index that cannot be a key (".", "..")     not retryable
      store         the archive failed (disk, S3 endpoint, bucket, keys)   retryable
      not_found     read(): nothing stored under that URI                  not retryable

A failing store is retryable even when it refuses outright (a wrong key, no
such bucket): that is the operator's to fix, as with the API key's 401, and
the image itself is fine.

No credential reaches a message or a log: downloads go through their own
session, which never carries the Modellix key (nor a .netrc login); a signed
URL's query string (its signature) is cut from every message; S3 error texts
are scrubbed of the AWS keys from the environment. This module logs nothing.
"""

from __future__ import annotations

import functools
import hashlib
import os
import re
import secrets
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol
from urllib.parse import unquote, urlsplit

import requests
from requests.adapters import HTTPAdapter

from worker.formats import ArchiveSpec
from worker.schemas import is_valid_job_id

if TYPE_CHECKING:
    from mypy_boto3_s3 import S3Client

# Downloads are read in pieces this large; at most this much is read past max_bytes.
CHUNK = 64 * 1024
# A signed URL may redirect once or twice (to a CDN edge); more is a loop.
MAX_REDIRECTS = 5
# Threads of one worker download at once: as many pooled connections per image host.
DOWNLOAD_POOL = 64
# S3 timeouts (seconds): botocore's 60 s connect would hold a worker thread a minute per
# attempt on an unreachable endpoint; the read timeout is per socket read, not per PUT.
S3_CONNECT_TIMEOUT = 5.0
S3_READ_TIMEOUT = 60.0
# The content types kept, by the magic bytes that prove them, and their extensions.
EXTENSIONS = {"image/png": "png", "image/jpeg": "jpg", "image/webp": "webp"}
_PNG = b"\x89PNG\r\n\x1a\n"
_JPEG = b"\xff\xd8\xff"
# Answers that mean the URL will not serve the image again (an expired signed URL is a 403).
_GONE = frozenset({403, 404, 410})
_BUSY = frozenset({408, 425, 429})
# The error codes of a GET for a key that does not exist (S3 and MinIO say NoSuchKey; a HEAD, 404).
_NO_KEY = frozenset({"NoSuchKey", "404"})


class ArchiveError(Exception):
    """An image not archived (or not read back): `reason` is a short stable word, see the module docstring."""

    def __init__(self, reason: str, message: str, retryable: bool):
        super().__init__(f"{reason}: {message}")
        self.reason = reason
        self.retryable = retryable


@dataclass(frozen=True)
class ArchivedFile:
    """One stored image, as a job records it."""

    uri: str  # file:///… or s3://bucket/key
    sha256: str  # hex digest of the stored bytes
    bytes: int
    content_type: str  # image/png, image/jpeg or image/webp

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


class Archive(Protocol):
    def put(self, job_id: str, index: int, data: bytes, content_type: str) -> ArchivedFile:
        """Store one image under <prefix>/<job_id>/<index>.<ext>, replacing what was there whole."""
        ...

    def read(self, uri: str) -> bytes:
        """The bytes stored under a URI this archive gave out."""
        ...


def open_archive(spec: str) -> Archive | None:
    """The archive KLING_ARCHIVE names, or None for `off`. Build one per process: an S3 client is costly."""
    parsed = ArchiveSpec.parse(spec)
    if parsed.kind == "file":
        return FileArchive(Path(parsed.location))
    if parsed.kind == "s3":
        return S3Archive(parsed.location, parsed.prefix)
    return None


def read(uri: str) -> bytes:
    """Read back a stored image by its URI alone, whatever KLING_ARCHIVE says now (for `results get`)."""
    scheme = urlsplit(uri).scheme
    if scheme == "file":
        return _read_file(_file_path(uri))
    if scheme == "s3":
        return S3Archive(urlsplit(uri).netloc, "").read(uri)
    raise ValueError(f"not an archive URI (file:// or s3://): {uri!r}")


# -- downloading ---------------------------------------------------------------


def fetch(url: str, max_bytes: int, timeout: float) -> bytes:
    """Download one image: http(s) only, at most max_bytes, in about `timeout` seconds at most.

    `timeout` bounds the connection, each read, and the whole transfer (checked
    after each piece, so a host trickling bytes holds the thread one read longer
    at most). The body is streamed and the download abandoned as soon as it
    passes max_bytes.
    """
    shown = _shown(url)
    parts = urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ArchiveError("bad_url", f"not an http(s) URL: {shown}", retryable=False)
    deadline = time.monotonic() + timeout
    session = _downloads()
    try:
        response = session.get(
            url, stream=True, timeout=timeout, proxies=_proxies(parts.scheme, parts.netloc), allow_redirects=True
        )
    except requests.TooManyRedirects:
        raise ArchiveError("bad_url", f"{shown}: more than {MAX_REDIRECTS} redirects", retryable=False) from None
    except (requests.exceptions.InvalidURL, requests.exceptions.InvalidSchema, requests.exceptions.MissingSchema):
        # The URL, or where it redirects to, is not one requests can fetch: trying again changes nothing.
        raise ArchiveError("bad_url", f"cannot fetch {shown}", retryable=False) from None
    except requests.RequestException as exc:
        raise ArchiveError("network", f"{shown}: {_scrub_url(str(exc), url)}", retryable=True) from None
    with response:
        status = response.status_code
        if status in _GONE:
            raise ArchiveError("expired", f"{shown} answered {status}", retryable=False)
        if status in _BUSY or status >= 500:
            raise ArchiveError("unavailable", f"{shown} answered {status}", retryable=True)
        if status != 200:
            raise ArchiveError(f"http_{status}", f"{shown} answered {status}", retryable=False)
        declared = response.headers.get("Content-Length", "")
        if declared.isdigit() and int(declared) > max_bytes:
            raise ArchiveError("too_large", f"{shown}: {declared} bytes, more than {max_bytes}", retryable=False)
        body = bytearray()
        try:
            for chunk in response.iter_content(CHUNK):
                body += chunk
                if len(body) > max_bytes:
                    raise ArchiveError("too_large", f"{shown}: more than {max_bytes} bytes", retryable=False)
                if time.monotonic() > deadline:
                    raise ArchiveError("network", f"{shown}: not downloaded within {timeout:g}s", retryable=True)
        except requests.RequestException as exc:
            raise ArchiveError("network", f"{shown}: {_scrub_url(str(exc), url)}", retryable=True) from None
    return bytes(body)


def sniff(data: bytes) -> tuple[str, str]:
    """(content type, extension) from the magic bytes: PNG, JPEG or WebP; anything else is not an image we keep."""
    if data.startswith(_PNG):
        return "image/png", "png"
    if data.startswith(_JPEG):
        return "image/jpeg", "jpg"
    if len(data) >= 12 and data[:4] == b"RIFF" and data[8:12] == b"WEBP":
        return "image/webp", "webp"
    raise ArchiveError(
        "not_image", f"not a PNG, JPEG or WebP image (starts with {data[:12].hex() or 'nothing'})", retryable=False
    )


def archive_one(archive: Archive, job_id: str, index: int, url: str, max_bytes: int, timeout: float) -> ArchivedFile:
    """Download the image at `url`, check what it is, and store it as the job's image number `index`."""
    data = fetch(url, max_bytes, timeout)
    content_type, _ = sniff(data)
    return archive.put(job_id, index, data, content_type)


# The variables that choose a download's proxy (requests.utils.get_environ_proxies reads them).
_PROXY_VARIABLES = ("http_proxy", "https_proxy", "all_proxy", "no_proxy")


def _proxies(scheme: str, netloc: str) -> dict[str, str]:
    """The environment's proxies for a host, as requests would choose them for each download;
    looked up once per host and setting, since requests scans the whole environment each time."""
    settings = tuple(os.environ.get(v) or os.environ.get(v.upper()) for v in _PROXY_VARIABLES)
    return dict(_proxies_for(scheme, netloc, settings))  # a copy: the cached one stays as it is


@functools.lru_cache(maxsize=256)
def _proxies_for(scheme: str, netloc: str, _settings: tuple[str | None, ...]) -> dict[str, str]:
    return dict(requests.utils.get_environ_proxies(f"{scheme}://{netloc}/"))


_session: requests.Session | None = None
_session_lock = threading.Lock()


def _downloads() -> requests.Session:
    """This process's download session: its own pool, and none of the Modellix client's headers.

    trust_env is off so that requests never adds a .netrc login to an image host;
    fetch passes the environment's proxies itself.
    """
    global _session
    with _session_lock:
        if _session is None:
            session = requests.Session()
            adapter = HTTPAdapter(pool_connections=8, pool_maxsize=DOWNLOAD_POOL, max_retries=0)
            session.mount("http://", adapter)
            session.mount("https://", adapter)
            session.max_redirects = MAX_REDIRECTS
            session.trust_env = False
            session.verify = os.environ.get("REQUESTS_CA_BUNDLE") or os.environ.get("CURL_CA_BUNDLE") or True
            session.headers.update({"User-Agent": "kling-worker/archive", "Accept": ", ".join(EXTENSIONS)})
            _session = session
        return _session


def _shown(url: str) -> str:
    """The URL without its query or login: a signed URL's query is a credential for the image."""
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc.rpartition('@')[2]}{parts.path}"


def _scrub_url(text: str, url: str) -> str:
    """An error text without the URL's query, however requests re-encoded it on the way."""
    return re.sub(r"\?[^\s)'\"]*", "?…", text.replace(url, _shown(url)))


# -- storing -------------------------------------------------------------------


def _key(job_id: str, index: int, content_type: str) -> str:
    """`<job_id>/<index>.<ext>`; a job id that could leave its folder ("..") is refused."""
    ext = EXTENSIONS.get(content_type)
    if ext is None:
        raise ValueError(f"not a content type the archive keeps: {content_type!r}")
    # The message schema's rule, plus "." and "..", which it allows but a path or key cannot take.
    if not is_valid_job_id(job_id) or job_id in (".", ".."):
        raise ArchiveError("bad_key", f"job id {job_id!r} cannot name a folder", retryable=False)
    if isinstance(index, bool) or not isinstance(index, int) or index < 0:
        raise ArchiveError("bad_key", f"image index {index!r} is not a number from 0", retryable=False)
    return f"{job_id}/{index}.{ext}"


class FileArchive:
    """A folder: <root>/<job_id>/<index>.<ext>, each written whole (temporary file, fsync, rename)."""

    def __init__(self, root: Path):
        if not root.is_absolute():
            raise ValueError(f"the archive folder must be absolute, not {str(root)!r}")
        self.root = Path(os.path.normpath(root))

    def __repr__(self) -> str:
        return f"FileArchive({str(self.root)!r})"

    def put(self, job_id: str, index: int, data: bytes, content_type: str) -> ArchivedFile:
        target = self.root / _key(job_id, index, content_type)
        digest = hashlib.sha256(data).hexdigest()
        # Beside the target (a rename within one file system is atomic), hidden, and unique per
        # call: two workers archiving the same job each write their own, and the last rename wins.
        temporary = target.with_name(f".{target.name}.{secrets.token_hex(8)}.tmp")
        try:
            target.parent.mkdir(parents=True, exist_ok=True)
            # Mode 0o666 less the umask, like any new file (mkstemp would make it 0o600).
            fd = os.open(temporary, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o666)
            try:
                with os.fdopen(fd, "wb") as file:
                    file.write(data)
                    file.flush()
                    # On disk before it gets its name: after a crash the name holds the old image or
                    # the new one, never an empty file whose digest the job has already recorded.
                    os.fsync(file.fileno())
                os.replace(temporary, target)
            except BaseException:
                temporary.unlink(missing_ok=True)
                raise
            _fsync_folder(target.parent)
        except OSError as exc:
            raise ArchiveError("store", f"cannot write {target}: {exc.strerror or exc}", retryable=True) from None
        return ArchivedFile(target.as_uri(), digest, len(data), content_type)

    def read(self, uri: str) -> bytes:
        path = _file_path(uri)
        if not path.is_relative_to(self.root):
            raise ValueError(f"{uri!r} is not in the archive {self.root.as_uri()}")
        return _read_file(path)


def _fsync_folder(folder: Path) -> None:
    # The rename itself is durable only once the folder's entry is on disk.
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _file_path(uri: str) -> Path:
    parts = urlsplit(uri)
    if parts.scheme != "file" or parts.netloc not in ("", "localhost"):
        raise ValueError(f"not a local file:// URI: {uri!r}")
    return Path(os.path.normpath(unquote(parts.path)))


def _read_file(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise ArchiveError("not_found", f"no file {path}", retryable=False) from None
    except OSError as exc:
        raise ArchiveError("store", f"cannot read {path}: {exc.strerror or exc}", retryable=True) from None


class S3Archive:
    """A bucket of any S3-compatible store: s3://<bucket>/<prefix>/<job_id>/<index>.<ext>, one PUT per image.

    The client is boto3's, configured from the AWS environment; it is thread-safe,
    so one per process serves every worker thread.
    """

    def __init__(self, bucket: str, prefix: str = "", client: S3Client | None = None):
        self.bucket = bucket
        self.prefix = prefix.strip("/")
        self._client = client or _s3_client()
        from botocore.exceptions import BotoCoreError, ClientError

        self._errors = (BotoCoreError, ClientError)
        self._client_error = ClientError

    def __repr__(self) -> str:
        return f"S3Archive('s3://{self.bucket}/{self.prefix}')"

    def put(self, job_id: str, index: int, data: bytes, content_type: str) -> ArchivedFile:
        key = "/".join(filter(None, (self.prefix, _key(job_id, index, content_type))))
        digest = hashlib.sha256(data).hexdigest()
        uri = f"s3://{self.bucket}/{key}"
        try:
            # The digest goes along as metadata, so the object says what it should hash to.
            self._client.put_object(
                Bucket=self.bucket, Key=key, Body=data, ContentType=content_type, Metadata={"sha256": digest}
            )
        except self._errors as exc:
            raise ArchiveError("store", f"cannot write {uri}: {_scrub_keys(str(exc))}", retryable=True) from None
        return ArchivedFile(uri, digest, len(data), content_type)

    def read(self, uri: str) -> bytes:
        parts = urlsplit(uri)
        if parts.scheme != "s3" or parts.netloc != self.bucket or not parts.path.strip("/"):
            raise ValueError(f"{uri!r} is not an object in the bucket {self.bucket!r}")
        try:
            return self._client.get_object(Bucket=self.bucket, Key=parts.path.lstrip("/"))["Body"].read()
        except self._errors as exc:
            missing = isinstance(exc, self._client_error) and exc.response.get("Error", {}).get("Code") in _NO_KEY
            if missing:
                raise ArchiveError("not_found", f"no object {uri}", retryable=False) from None
            raise ArchiveError("store", f"cannot read {uri}: {_scrub_keys(str(exc))}", retryable=True) from None


def _s3_client() -> S3Client:
    # Imported here: boto3 takes 0.1-0.15 s to import, and only an s3:// archive needs it.
    import boto3
    from botocore.config import Config

    # A session of our own: boto3's default session is not safe to build clients from in several threads.
    # Retries: botocore's "standard" mode (3 attempts, AWS_MAX_ATTEMPTS overrides) rides out a 503 SlowDown.
    config = Config(connect_timeout=S3_CONNECT_TIMEOUT, read_timeout=S3_READ_TIMEOUT, retries={"mode": "standard"})
    return boto3.session.Session().client("s3", config=config)


def _scrub_keys(text: str) -> str:
    # botocore's messages name no key today; this keeps it so if one ever echoes a request.
    for name in ("AWS_SECRET_ACCESS_KEY", "AWS_ACCESS_KEY_ID", "AWS_SESSION_TOKEN"):
        value = os.environ.get(name, "")
        if len(value) >= 4:
            text = text.replace(value, "***")
    return text
