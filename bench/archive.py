"""How fast result images are archived: file:// and s3:// (moto's S3 server), and a download end to end.

    python bench/archive.py                        # 200 images of 1 MiB, 1 and 4 threads, 3 rounds
    python bench/archive.py --images 100 --threads 1 8 --rounds 5

For each case it prints images/s and MB/s (10^6 bytes) of `put` (store only: sha256, write,
fsync, rename; or one PUT), the median of the rounds:

- `file://` into a temporary folder (its file system is printed), with `Path.write_bytes`
  beside it as the ceiling without fsync or rename;
- `s3://` into moto's standalone S3 server, in its own process (so it does not share this
  one's GIL): a local, in-memory S3-compatible server, so a floor for the client's own
  cost, not a figure for MinIO or AWS;
- `archive_one` end to end: download from the sandbox (in this process; 1 MiB noise PNGs),
  sniff, store to `file://`.

Images are 1 MiB PNGs of noise (the sandbox's result_png, 592 x 592), distinct per image.
"""

from __future__ import annotations

import argparse
import os
import platform
import shutil
import socket
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from worker.dev.sandbox import SandboxServer, result_png  # noqa: E402
from worker.modellix import ModellixClient  # noqa: E402
from worker.results.archive import Archive, FileArchive, S3Archive, archive_one  # noqa: E402

SIDE = 592  # 592 x 592 RGB, stored: 1 MiB


def machine() -> str:
    model = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    system = f"{platform.system()} {platform.release()}"
    return f"{os.cpu_count()} cores ({model}), {system}, Python {platform.python_version()}"


def fs_type(folder: Path) -> str:
    found = subprocess.run(["stat", "-f", "-c", "%T", str(folder)], capture_output=True, text=True)
    return found.stdout.strip() or "unknown"


def timed(work: Callable[[int], object], count: int, threads: int) -> float:
    """Seconds to run work(0..count-1) on `threads` threads."""
    started = time.perf_counter()
    with ThreadPoolExecutor(threads) as pool:
        list(pool.map(work, range(count)))
    return time.perf_counter() - started


def report(name: str, threads: int, count: int, size: int, seconds: list[float]) -> None:
    median = statistics.median(seconds)
    print(
        f"{name:<34} {threads:>2} thread(s): {count / median:8.1f} images/s {count * size / median / 1e6:8.1f} MB/s"
        f"   (median of {len(seconds)}: {', '.join(f'{s:.2f}' for s in seconds)} s)",
        flush=True,
    )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def start_moto() -> tuple[subprocess.Popen[bytes], str]:
    port = free_port()
    server = subprocess.Popen(
        [sys.executable, "-m", "moto.server", "-H", "127.0.0.1", "-p", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 30
    while True:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return server, f"http://127.0.0.1:{port}"
        except OSError:
            if time.monotonic() > deadline:
                server.kill()
                raise SystemExit("moto's server did not start") from None
            time.sleep(0.1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--images", type=int, default=200)
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 4])
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()

    images = [result_png(f"bench-{i}", 0, SIDE) for i in range(args.images)]
    size = len(images[0])
    print(f"# {machine()}")
    print(f"# {args.images} images of {size:,} bytes, {args.rounds} rounds; MB = 10^6 bytes")

    with tempfile.TemporaryDirectory(prefix="kling-archive-bench-") as tmp:
        base = Path(tmp)
        print(f"# file:// folder on {fs_type(base)}")

        def into_folder(put: Callable[[Path, int], object], threads: int) -> float:
            folder = base / uuid.uuid4().hex
            folder.mkdir()
            try:
                return timed(lambda i: put(folder, i), args.images, threads)
            finally:
                shutil.rmtree(folder)  # 1 MiB x images x rounds x cases would fill /tmp

        for threads in args.threads:
            plain = [
                into_folder(lambda f, i: (f / f"{i}.png").write_bytes(images[i]), threads) for _ in range(args.rounds)
            ]
            report("Path.write_bytes (no fsync)", threads, args.images, size, plain)
            kept = [
                into_folder(lambda f, i: FileArchive(f).put(f"job-{i}", 0, images[i], "image/png"), threads)
                for _ in range(args.rounds)
            ]
            report("file:// put", threads, args.images, size, kept)

        moto, endpoint = start_moto()
        try:
            os.environ.update(
                AWS_ENDPOINT_URL=endpoint,
                AWS_ACCESS_KEY_ID="bench",
                AWS_SECRET_ACCESS_KEY="bench-secret",
                AWS_DEFAULT_REGION="us-east-1",
            )
            import boto3

            # One bucket, the same keys each round: moto keeps objects in memory, a new PUT frees the old.
            bucket = "bench-" + uuid.uuid4().hex[:12]
            boto3.session.Session().client("s3").create_bucket(Bucket=bucket)
            s3: Archive = S3Archive(bucket, "results")
            for threads in args.threads:
                seconds = [
                    timed(lambda i: s3.put(f"job-{i}", 0, images[i], "image/png"), args.images, threads)
                    for _ in range(args.rounds)
                ]
                report("s3:// put (moto, own process)", threads, args.images, size, seconds)
        finally:
            moto.terminate()
            moto.wait(10)

        with SandboxServer(task_seconds=0.2, result_side=SIDE) as sandbox:
            client = ModellixClient(sandbox.url, sandbox.api_key)
            urls = []
            for _ in range(args.images):
                task_id = client.submit({"prompt": f"bench {uuid.uuid4().hex}"}).task_id
                urls.append(f"{sandbox.url}/results/{task_id}/0.png")
            client.close()
            time.sleep(0.3)  # every task has finished: its image is served
            for threads in args.threads:
                seconds = [
                    into_folder(lambda f, i: archive_one(FileArchive(f), f"job-{i}", 0, urls[i], 2 * size, 30), threads)
                    for _ in range(args.rounds)
                ]
                report("archive_one: sandbox -> file://", threads, args.images, size, seconds)


if __name__ == "__main__":
    main()
