"""The archive (worker/results/archive.py) against real parts: folders in tmp_path, a real S3-compatible
server (moto's, over HTTP on a free port), and the sandbox's result URLs.

Nothing here mocks a client call: downloads go over HTTP to the sandbox, S3 PUTs and GETs to
moto's server through boto3, files to the disk.
"""

from __future__ import annotations

import hashlib
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
import requests

from worker.config import Settings
from worker.dev.sandbox import Step, result_png
from worker.modellix import ModellixClient
from worker.results import archive
from worker.results.archive import (
    ArchivedFile,
    ArchiveError,
    ArchiveSpec,
    FileArchive,
    S3Archive,
    archive_one,
    fetch,
    open_archive,
    sniff,
)

MiB = 1024 * 1024
JPEG = b"\xff\xd8\xff\xe0\x00\x10JFIF\x00\x01\x01\x00\x00\x01\x00\x01\x00\x00" + bytes(16)
WEBP = b"RIFF\x24\x00\x00\x00WEBPVP8 \x18\x00\x00\x00" + bytes(24)


def files_under(root: Path) -> list[str]:
    """Every file below root, hidden ones included, as sorted relative paths."""
    return sorted(str(p.relative_to(root)) for p in root.rglob("*") if p.is_file())


def sha256(data: bytes) -> str:
    return hashlib.sha256(data).hexdigest()


# -- sniffing ---------------------------------------------------------------------


@pytest.mark.parametrize(
    "data, expected",
    [
        (result_png("task-1", 0), ("image/png", "png")),
        (JPEG, ("image/jpeg", "jpg")),
        (b"\xff\xd8\xff\xdb" + bytes(8), ("image/jpeg", "jpg")),  # a bare JPEG (no JFIF segment)
        (WEBP, ("image/webp", "webp")),
    ],
)
def test_sniff_knows_png_jpeg_and_webp_by_their_bytes(data, expected):
    assert sniff(data) == expected


@pytest.mark.parametrize(
    "data",
    [
        b"",
        b"GIF89a\x01\x00\x01\x00",
        b"<html><body>Sign in</body></html>",
        b'{"code": 403}',
        b"\x89PNG\r\n",  # a PNG cut before its signature ends
        b"\xff\xd8",  # two bytes of a JPEG's three
        b"RIFF\x24\x00\x00\x00WAVEfmt ",  # RIFF, but audio
        b"RIFF\x24\x00\x00WEBP",  # "WEBP" at the wrong offset
    ],
)
def test_sniff_refuses_anything_else_for_good(data):
    with pytest.raises(ArchiveError) as caught:
        sniff(data)
    assert caught.value.reason == "not_image" and caught.value.retryable is False
    assert str(caught.value).startswith("not_image: ")


# -- KLING_ARCHIVE ------------------------------------------------------------------


@pytest.mark.parametrize(
    "spec, parsed",
    [
        ("off", ArchiveSpec("off")),
        (" OFF ", ArchiveSpec("off")),
        ("file:///srv/kling/results", ArchiveSpec("file", "/srv/kling/results")),
        ("file:///srv/kling/results/", ArchiveSpec("file", "/srv/kling/results")),
        ("file://localhost/srv/my%20results", ArchiveSpec("file", "/srv/my results")),
        ("s3://kling-results", ArchiveSpec("s3", "kling-results", "")),
        ("s3://kling-results/results", ArchiveSpec("s3", "kling-results", "results")),
        ("s3://kling.results-2/a/b/", ArchiveSpec("s3", "kling.results-2", "a/b")),
    ],
)
def test_archive_specs(spec, parsed):
    assert ArchiveSpec.parse(spec) == parsed


@pytest.mark.parametrize(
    "spec, says",
    [
        ("", "must be file:///absolute/dir, s3://bucket/prefix or off"),
        ("results", "must be file:///absolute/dir"),
        ("/srv/results", "must be file:///absolute/dir"),
        ("file://results", "absolute folder (three slashes)"),
        ("file:results", "absolute folder"),
        ("file:///srv/results?x=1", "must be file:///absolute/dir"),
        ("s3://Kling_Results/x", "is not an S3 bucket name"),
        ("s3:///results", "is not an S3 bucket name"),
        ("s3://kling-results/a//b", "empty, '.' or '..' part"),
        ("s3://kling-results/a/../b", "empty, '.' or '..' part"),
        ("https://kling-results.s3.amazonaws.com/x", "must be file:///absolute/dir"),
    ],
)
def test_bad_archive_specs_are_named(spec, says):
    with pytest.raises(ValueError, match="KLING_ARCHIVE") as caught:
        open_archive(spec)
    assert says in str(caught.value)


def test_a_spec_with_a_login_is_refused_without_echoing_it():
    with pytest.raises(ValueError) as caught:
        ArchiveSpec.parse("s3://AKIAEXAMPLE:hunter2-secret@kling-results/x")
    assert "AWS_ACCESS_KEY_ID" in str(caught.value)
    assert "hunter2" not in str(caught.value) and "AKIAEXAMPLE" not in str(caught.value)


def test_open_archive_is_none_for_off_and_touches_no_disk(tmp_path):
    assert open_archive("off") is None
    store = open_archive((tmp_path / "later").as_uri())
    assert isinstance(store, FileArchive) and store.root == tmp_path / "later"
    assert not (tmp_path / "later").exists()  # made by the first put, not by a start-up that may never store


def test_settings_default_to_a_folder_under_kling_home(monkeypatch, tmp_path):
    monkeypatch.setenv("KLING_HOME", str(tmp_path / "home dir"))
    for name in ("KLING_ARCHIVE", "KLING_ARCHIVE_MAX_BYTES"):
        monkeypatch.delenv(name, raising=False)
    cfg = Settings()
    assert cfg.archive == (tmp_path / "home dir" / "results").as_uri()
    assert cfg.archive.startswith("file:///") and "%20" in cfg.archive
    assert ArchiveSpec.parse(cfg.archive) == ArchiveSpec("file", str(tmp_path / "home dir" / "results"))
    assert cfg.archive_max_bytes == 50 * MiB

    monkeypatch.setenv("KLING_ARCHIVE", "s3://kling-results/results")
    monkeypatch.setenv("KLING_ARCHIVE_MAX_BYTES", "1000")
    cfg = Settings()
    assert (cfg.archive, cfg.archive_max_bytes) == ("s3://kling-results/results", 1000)


def test_settings_refuse_a_bad_archive_at_start_up(monkeypatch):
    monkeypatch.setenv("KLING_ARCHIVE", "s3://Not A Bucket")
    with pytest.raises(ValueError, match="KLING_ARCHIVE must be"):
        Settings()
    monkeypatch.setenv("KLING_ARCHIVE", "off")
    assert Settings().archive == "off"
    with pytest.raises(ValueError, match="KLING_ARCHIVE_MAX_BYTES must be at least 1"):
        Settings(archive_max_bytes=0)


# -- the folder backend --------------------------------------------------------------


def test_file_round_trip(tmp_path):
    store = open_archive((tmp_path / "results").as_uri())
    assert store is not None
    data = result_png("task-1", 0)
    kept = store.put("job-1", 0, data, "image/png")
    path = tmp_path / "results" / "job-1" / "0.png"
    assert kept == ArchivedFile(path.as_uri(), sha256(data), len(data), "image/png")
    described = {"uri": path.as_uri(), "sha256": sha256(data), "bytes": len(data), "content_type": "image/png"}
    assert kept.to_json() == described
    assert path.read_bytes() == data
    assert store.read(kept.uri) == data
    assert archive.read(kept.uri) == data  # by the URI alone, as `results get` reads
    assert files_under(tmp_path / "results") == ["job-1/0.png"]


def test_file_key_layout(tmp_path):
    store = FileArchive(tmp_path / "my results")
    job = "order:12.a-b_C"  # every character a job id may hold
    jpeg = store.put(job, 3, JPEG, "image/jpeg")
    webp = store.put(job, 10, WEBP, "image/webp")
    assert files_under(tmp_path / "my results") == [f"{job}/10.webp", f"{job}/3.jpg"]
    assert jpeg.uri == (tmp_path / "my results" / job / "3.jpg").as_uri() and "%20" in jpeg.uri
    assert (jpeg.content_type, webp.content_type) == ("image/jpeg", "image/webp")
    assert store.read(jpeg.uri) == JPEG and archive.read(webp.uri) == WEBP


def test_archiving_a_job_again_replaces_each_file_whole(tmp_path):
    """A reader never sees a torn, empty or missing file while the same job is archived over and over."""
    store = FileArchive(tmp_path)
    # Large enough that a write in place would be seen half done.
    first = b"\x89PNG\r\n\x1a\n" + b"\x01" * (4 * MiB)
    second = b"\x89PNG\r\n\x1a\n" + b"\x02" * (3 * MiB)
    path = tmp_path / "job-1" / "0.png"
    store.put("job-1", 0, first, "image/png")
    done = threading.Event()
    bad: list[str] = []
    reads = 0

    def writer() -> None:
        try:
            for k in range(41):  # ends on `second`
                store.put("job-1", 0, second if k % 2 == 0 else first, "image/png")
        finally:
            done.set()

    thread = threading.Thread(target=writer)
    thread.start()
    while not done.is_set():
        try:
            seen = path.read_bytes()
        except FileNotFoundError:
            bad.append("missing")
            continue
        reads += 1
        if seen not in (first, second):
            bad.append(f"{len(seen)} bytes")
    thread.join()
    assert reads >= 5, "the reader must overlap the writer"
    assert bad == []
    assert path.read_bytes() == second  # the last put wins
    assert files_under(tmp_path) == ["job-1/0.png"]  # one copy, no temporary file left


def test_a_failed_write_is_retryable_and_leaves_nothing_behind(tmp_path):
    store = FileArchive(tmp_path / "results")
    # The target's name is taken by a folder: the rename fails after the data was written.
    (tmp_path / "results" / "job-1" / "0.png").mkdir(parents=True)
    (tmp_path / "results" / "job-1" / "0.png" / "keep").write_bytes(b"x")
    with pytest.raises(ArchiveError) as caught:
        store.put("job-1", 0, result_png("t", 0), "image/png")
    assert caught.value.reason == "store" and caught.value.retryable is True
    assert files_under(tmp_path / "results") == ["job-1/0.png/keep"]  # no temporary file left

    (tmp_path / "file").write_bytes(b"")  # a folder that cannot be made
    with pytest.raises(ArchiveError) as caught:
        FileArchive(tmp_path / "file" / "results").put("job-1", 0, b"\x89PNG\r\n\x1a\n", "image/png")
    assert caught.value.reason == "store" and caught.value.retryable is True


@pytest.mark.parametrize("job_id, index", [("..", 0), (".", 0), ("a/b", 0), ("", 0), ("x" * 65, 0), ("ok", -1)])
def test_a_key_that_would_leave_its_folder_is_refused(tmp_path, job_id, index):
    store = FileArchive(tmp_path / "results")
    with pytest.raises(ArchiveError) as caught:
        store.put(job_id, index, b"\x89PNG\r\n\x1a\n", "image/png")
    assert caught.value.reason == "bad_key" and caught.value.retryable is False
    assert files_under(tmp_path) == []


def test_only_the_three_image_types_are_stored(tmp_path):
    with pytest.raises(ValueError, match="image/gif"):
        FileArchive(tmp_path).put("job-1", 0, b"GIF89a", "image/gif")


def test_read_stays_in_the_archive_and_reports_what_is_missing(tmp_path):
    store = FileArchive(tmp_path / "results")
    (tmp_path / "secret.txt").write_text("not an image")
    with pytest.raises(ValueError, match="is not in the archive"):
        store.read((tmp_path / "secret.txt").as_uri())
    with pytest.raises(ValueError, match="is not in the archive"):
        store.read((tmp_path / "results" / ".." / "secret.txt").as_uri())
    with pytest.raises(ArchiveError) as caught:
        store.read((tmp_path / "results" / "job-1" / "9.png").as_uri())
    assert caught.value.reason == "not_found" and caught.value.retryable is False
    with pytest.raises(ValueError):
        store.read("s3://kling-results/job-1/0.png")
    with pytest.raises(ValueError, match="not an archive URI"):
        archive.read("https://example.com/job-1/0.png")


# -- the S3 backend, against moto's S3-compatible server ----------------------------


def test_s3_round_trip(bucket, moto_url):
    store = open_archive(f"s3://{bucket}/results")
    assert isinstance(store, S3Archive)
    data = result_png("task-1", 0)
    kept = store.put("job-1", 0, data, "image/png")
    assert kept == ArchivedFile(f"s3://{bucket}/results/job-1/0.png", sha256(data), len(data), "image/png")
    assert store.read(kept.uri) == data
    assert archive.read(kept.uri) == data  # by the URI alone, as `results get` reads
    # The object is on the server, as any HTTP client sees it through a presigned URL of another client.
    import boto3

    signed = (
        boto3.session.Session()
        .client("s3")
        .generate_presigned_url("get_object", Params={"Bucket": bucket, "Key": "results/job-1/0.png"})
    )
    assert signed.startswith(f"{moto_url}/{bucket}/results/job-1/0.png?")
    seen = requests.get(signed, timeout=10)
    assert seen.status_code == 200 and seen.content == data
    assert seen.headers["Content-Type"] == "image/png" and seen.headers["x-amz-meta-sha256"] == sha256(data)


def test_s3_archiving_again_keeps_one_object_per_image(bucket):
    import boto3

    store = open_archive(f"s3://{bucket}")
    assert store is not None
    store.put("job-1", 0, JPEG, "image/jpeg")
    again = store.put("job-1", 0, JPEG + b"\x00", "image/jpeg")
    store.put("job-1", 1, WEBP, "image/webp")
    assert again.uri == f"s3://{bucket}/job-1/0.jpg"  # no prefix: keys start at the job
    listed = boto3.session.Session().client("s3").list_objects_v2(Bucket=bucket)
    assert sorted(o["Key"] for o in listed["Contents"]) == ["job-1/0.jpg", "job-1/1.webp"]
    assert store.read(again.uri) == JPEG + b"\x00"


def test_s3_failures_are_retryable_and_name_no_key(aws_env, bucket, monkeypatch):
    secrets = (aws_env["AWS_ACCESS_KEY_ID"], aws_env["AWS_SECRET_ACCESS_KEY"])
    missing_bucket = S3Archive("kling-no-such-bucket-" + uuid.uuid4().hex[:8], "results")
    with pytest.raises(ArchiveError) as caught:
        missing_bucket.put("job-1", 0, JPEG, "image/jpeg")
    assert caught.value.reason == "store" and caught.value.retryable is True
    assert "NoSuchBucket" in str(caught.value)
    assert not any(s in str(caught.value) for s in secrets)

    with pytest.raises(ArchiveError) as caught:
        S3Archive(bucket).read(f"s3://{bucket}/job-1/9.png")
    assert caught.value.reason == "not_found" and caught.value.retryable is False

    with socket.socket() as closed:  # a port nothing listens on
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{port}")
    monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
    with pytest.raises(ArchiveError) as caught:
        S3Archive(bucket, "results").put("job-1", 0, JPEG, "image/jpeg")
    assert caught.value.reason == "store" and caught.value.retryable is True
    assert "Could not connect" in str(caught.value)
    assert not any(s in str(caught.value) for s in secrets)


# -- downloads, against the sandbox's result URLs -------------------------------------


@pytest.fixture
def api(sandbox) -> Iterator[ModellixClient]:
    """The Modellix client, alive in this process while images download (its session carries the key)."""
    client = ModellixClient(sandbox.url, sandbox.api_key)
    yield client
    client.close()


def finished(api: ModellixClient, n: int = 1) -> list[str]:
    """Submit a task to the sandbox and follow it to the end: its result URLs."""
    task_id = api.submit({"prompt": f"a cat {uuid.uuid4().hex}", "n": n}).task_id
    deadline = time.monotonic() + 30
    while True:
        state = api.get_task(task_id)
        if state.finished or time.monotonic() > deadline:
            break
        time.sleep(0.05)
    assert state.succeeded, state
    assert len(state.result_urls) == n
    return state.result_urls


def refused(call) -> ArchiveError:
    with pytest.raises(ArchiveError) as caught:
        call()
    return caught.value


def test_archive_one_keeps_each_result_image(sandbox, api, tmp_path):
    urls = finished(api, n=2)
    store = FileArchive(tmp_path / "results")
    kept = [archive_one(store, "job-1", k, url, MiB, 10) for k, url in enumerate(urls)]
    for k, (url, image) in enumerate(zip(urls, kept, strict=True)):
        served = requests.get(url, timeout=10).content
        path = tmp_path / "results" / "job-1" / f"{k}.png"
        assert image == ArchivedFile(path.as_uri(), sha256(served), len(served), "image/png")
        assert path.read_bytes() == served
    assert kept[0].sha256 != kept[1].sha256
    assert files_under(tmp_path / "results") == ["job-1/0.png", "job-1/1.png"]


def test_downloads_never_carry_the_modellix_key(sandbox, api):
    (url,) = finished(api)
    # The sandbox refuses a result download that carries a key (as S3 does a presigned URL with one)...
    with_key = requests.get(url, headers=dict(api.session.headers), timeout=10)
    assert with_key.status_code == 400 and b"Only one auth mechanism allowed" in with_key.content
    # ...and fetch's session, a separate one, gets the image while the client's is alive.
    assert fetch(url, MiB, 10) == requests.get(url, timeout=10).content
    assert "Authorization" not in archive._downloads().headers


def test_an_expired_url_is_not_retryable(sandbox, api, tmp_path):
    (url,) = finished(api)
    sandbox.result_ttl = 3600
    assert sniff(fetch(url, MiB, 10)) == ("image/png", "png")
    sandbox.result_ttl = 0  # expired as soon as the task finished
    error = refused(lambda: archive_one(FileArchive(tmp_path), "job-1", 0, url, MiB, 10))
    assert (error.reason, error.retryable) == ("expired", False)
    assert "answered 403" in str(error)
    assert files_under(tmp_path) == []


@pytest.mark.parametrize(
    "answer, reason", [(500, "unavailable"), (503, "unavailable"), (429, "unavailable"), ("drop", "network")]
)
def test_server_errors_and_lost_answers_are_retryable(sandbox, api, answer, reason):
    (url,) = finished(api)
    sandbox.script(Step(answer, on="result"))
    error = refused(lambda: fetch(url, MiB, 10))
    assert (error.reason, error.retryable) == (reason, True)
    assert sniff(fetch(url, MiB, 10))[0] == "image/png"  # and the next try gets the image


def test_too_large_is_not_retryable(sandbox, api):
    (url,) = finished(api)
    size = len(requests.get(url, timeout=10).content)
    assert len(fetch(url, size, 10)) == size  # exactly max_bytes is allowed
    error = refused(lambda: fetch(url, size - 1, 10))
    assert (error.reason, error.retryable) == ("too_large", False)


def test_a_body_without_an_end_is_cut_past_max_bytes(sandbox, api):
    (url,) = finished(api)
    sandbox.script(Step("endless", on="result"))  # chunked, no Content-Length, 256 MiB if read to the end
    started = time.monotonic()
    error = refused(lambda: fetch(url, 2 * MiB, 30))
    assert (error.reason, error.retryable) == ("too_large", False)
    assert time.monotonic() - started < 10
    assert sniff(fetch(url, MiB, 10))[0] == "image/png"  # the sandbox serves on


def test_a_body_that_is_not_an_image_is_not_retryable(sandbox, api, tmp_path):
    (url,) = finished(api)
    sandbox.script(Step("not_image", on="result"))  # an HTML page sent as Content-Type: image/png
    error = refused(lambda: archive_one(FileArchive(tmp_path), "job-1", 0, url, MiB, 10))
    assert (error.reason, error.retryable) == ("not_image", False)
    assert files_under(tmp_path) == []


@pytest.mark.parametrize(
    "url",
    ["ftp://example.com/0.png", "file:///etc/hostname", "not a url", "http:///0.png", "http://bad host/0.png"],
)
def test_only_http_urls_are_fetched(url):
    error = refused(lambda: fetch(url, MiB, 10))
    assert (error.reason, error.retryable) == ("bad_url", False)


def test_unreachable_and_silent_hosts_are_retryable():
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    error = refused(lambda: fetch(f"http://127.0.0.1:{port}/0.png", MiB, 5))
    assert (error.reason, error.retryable) == ("network", True)

    with socket.socket() as silent:  # accepts connections (the backlog) and never answers
        silent.bind(("127.0.0.1", 0))
        silent.listen(4)
        started = time.monotonic()
        error = refused(lambda: fetch(f"http://127.0.0.1:{silent.getsockname()[1]}/0.png", MiB, 0.5))
    assert (error.reason, error.retryable) == ("network", True)
    assert time.monotonic() - started < 5


def test_a_signed_urls_query_stays_out_of_messages(sandbox, api):
    (url,) = finished(api)
    signed = url + "?X-Amz-Credential=AKIASIGNED&X-Amz-Signature=topsecret0123456789"
    for step in (Step(500, on="result"), Step("drop", on="result")):
        sandbox.script(step)
        assert "topsecret" not in str(refused(lambda: fetch(signed, MiB, 10)))
    with socket.socket() as closed:
        closed.bind(("127.0.0.1", 0))
        port = closed.getsockname()[1]
    error = refused(lambda: fetch(f"http://127.0.0.1:{port}/0.png?sig=topsecret%2F0123", MiB, 5))
    assert "topsecret" not in str(error) and f"127.0.0.1:{port}/0.png" in str(error)
    assert fetch(signed, MiB, 10).startswith(b"\x89PNG")  # the query itself is sent


def test_files_are_created_with_the_umask_not_private(tmp_path):
    kept = FileArchive(tmp_path).put("job-1", 0, b"\x89PNG\r\n\x1a\n", "image/png")
    mode = os.stat(Path(archive._file_path(kept.uri))).st_mode & 0o777
    umask = os.umask(0)
    os.umask(umask)
    assert mode == 0o666 & ~umask


def test_an_s3_error_that_echoes_the_credentials_is_scrubbed(aws_env, monkeypatch):
    """botocore never puts a key in its own messages, but it repeats the store's: an S3-compatible store
    that echoes the request's Authorization header (a real HTTP server here, answering every request
    with that echo) hands the access key id to the error text, which must not carry it on."""
    from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

    class Echo(BaseHTTPRequestHandler):
        def do_PUT(self) -> None:
            length = int(self.headers.get("Content-Length") or 0)
            self.rfile.read(length)
            said = f"{self.headers.get('Authorization')} (secret {aws_env['AWS_SECRET_ACCESS_KEY']})"
            body = f"<Error><Code>AccessDenied</Code><Message>refused: {said}</Message></Error>".encode()
            self.send_response(403)
            self.send_header("Content-Type", "application/xml")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, *_: object) -> None:
            pass

    server = ThreadingHTTPServer(("127.0.0.1", 0), Echo)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        monkeypatch.setenv("AWS_ENDPOINT_URL", f"http://127.0.0.1:{server.server_address[1]}")
        monkeypatch.setenv("AWS_MAX_ATTEMPTS", "1")
        with pytest.raises(ArchiveError) as caught:
            S3Archive("kling-echo", "results").put("job-1", 0, JPEG, "image/jpeg")
    finally:
        server.shutdown()
        server.server_close()
    text = str(caught.value)
    assert "AccessDenied" in text and "Credential=" in text  # the store's words reached the error
    assert aws_env["AWS_ACCESS_KEY_ID"] not in text and aws_env["AWS_SECRET_ACCESS_KEY"] not in text
    assert "***" in text
