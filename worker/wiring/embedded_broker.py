# mypy: disallow-untyped-calls=False
# (kombu's transport classes and helpers are untyped; this module subclasses and calls them.)
"""The embedded broker: kombu's filesystem transport, made to give back what a dead consumer held.

Boundary: a kombu transport (Transport, Channel, QoS) over folders and files. Nothing of Celery
or of jobs; worker.wiring.app selects it for the embedded ``filesystem://`` default.

Guarantee: at least once. A message stays on disk until its consumer acks it; if the consuming
process dies first (a crash, SIGKILL), the message is delivered again to another consumer.
kombu's own filesystem transport deletes a message file when a consumer reads it, so every
message a killed worker held (running, prefetched, waiting for its ETA) was lost.

    <queue>/<ms>_<uuid>.<queue name>.msg    ready (kombu's name and format)
    <unacked>/<pid>-<hex>/.lock             flock'ed by the consuming process for its lifetime
    <unacked>/<pid>-<hex>/<same name>       delivered, not acked yet
    <bad>/<same name>                       did not parse; kept for a person to look at

- Claim: one atomic rename from the queue folder into this process's unacked folder; a rename
  that fails because another consumer was first moves on to the next file.
- Ack, and reject without requeue: the claimed file is deleted (moved to ``processed_folder``
  with ``store_processed``). Reject with requeue, and restoring at channel close: renamed back
  under its own name, so it keeps its place and is not duplicated.
- The kernel drops a process's flock when the process dies, SIGKILL included. Reaping: any
  unacked folder whose lock can be taken belongs to a dead process; its files go back to the
  queue folder. Every channel reaps when it opens and, while polling, every REAP_INTERVAL seconds.
- Publishing writes under a name readers do not match, then renames it into place: a reader
  never sees half a message.

Not covered: power loss or a kernel crash (nothing is fsynced), and folders on a network file
system (flock and rename atomicity are local). The queue and unacked folders must be on one file
system. Files keep kombu's names and format, so a plain ``filesystem://`` producer or consumer
given the same folders still works with this one (without redelivery on its own side).
"""

from __future__ import annotations

import fcntl
import itertools
import logging
import os
import threading
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from queue import Empty
from typing import Any

from kombu.exceptions import ChannelError
from kombu.transport import filesystem, virtual
from kombu.utils.encoding import bytes_to_str, str_to_bytes
from kombu.utils.json import dumps, loads

log = logging.getLogger(__name__)

#: Seconds between two reaps while a channel polls: a dead consumer's messages wait at most
#: this long, plus one polling interval, for a consumer that is already running.
REAP_INTERVAL = 2.0
#: An empty message file younger than this may be a plain kombu producer's, caught between its
#: open() and its write (it locks only after opening): it goes back to the queue, not to bad/.
WRITER_GRACE = 5.0
#: The lock file in each unacked folder.
LOCK = ".lock"


@dataclass
class _Holder:
    """This process's unacked folder under one broker, locked for as long as the process lives."""

    folder: Path
    lock_fd: int
    # Delivery tag -> claimed file. Per process, not per channel: kombu may reject a message
    # through another channel of the connection than the one that read it.
    claims: dict[str, Path] = field(default_factory=dict)


_holders: dict[Path, _Holder] = {}
_sequence = itertools.count()
_holders_lock = threading.Lock()


def _holder(root: Path) -> _Holder:
    held = _holders.get(root)
    if held is None:
        with _holders_lock:
            held = _holders.get(root)
            if held is None:
                held = _holders[root] = _take_folder(root)
    return held


def _claims(root: Path) -> dict[str, Path]:
    held = _holders.get(root)
    return held.claims if held is not None else {}


def _take_folder(root: Path) -> _Holder:
    root.mkdir(exist_ok=True)
    name = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
    # Made under a dot name (reapers skip those) and renamed into place once locked:
    # a reaper never finds it unlocked while its owner lives.
    staging = root / f".{name}"
    staging.mkdir()
    fd = os.open(staging / LOCK, os.O_RDWR | os.O_CREAT, 0o644)
    fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    folder = root / name
    os.rename(staging, folder)
    log.info(
        "embedded broker: this process holds its unacknowledged messages in %s",
        folder,
        extra={"event": "embedded_broker_holder"},
    )
    return _Holder(folder, fd)


def _forget_parent_folders() -> None:
    # A forked child shares the parent's lock (flock belongs to the open file, not the process):
    # left open, it would keep a dead parent's messages from ever being reaped. Closing the
    # child's descriptor (never LOCK_UN, which would unlock the parent too) drops only its share;
    # the child claims into a folder of its own and leaves the parent's claims alone.
    global _holders_lock
    for held in _holders.values():
        os.close(held.lock_fd)
    _holders.clear()
    _holders_lock = threading.Lock()  # another thread of the parent may have held it at the fork


os.register_at_fork(after_in_child=_forget_parent_folders)


def reap(root: Path, queue_folder: Path) -> int:
    """Move the messages of every dead consumer under `root` back to `queue_folder`; returns how many."""
    try:
        names = os.listdir(root)
    except FileNotFoundError:
        return 0  # nothing was ever claimed under this broker
    own = _holders.get(root)
    moved = 0
    for name in names:
        if name.startswith(".") or (own is not None and own.folder.name == name):
            continue
        moved += _reap_folder(root / name, queue_folder)
    return moved


def _reap_folder(folder: Path, queue_folder: Path) -> int:
    try:
        fd = os.open(folder / LOCK, os.O_RDWR)
    except FileNotFoundError:
        return 0  # another process reaped it just now
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            return 0  # its consumer is alive (or another reaper holds it)
        try:
            names = os.listdir(folder)
        except FileNotFoundError:
            return 0  # reaped by another process between our open and our lock
        moved = [name for name in names if name != LOCK]
        for name in moved:
            # Under its own name, so a message keeps its place near the head of the queue.
            os.rename(folder / name, queue_folder / name)
        # Folder removed before the lock is let go: a reaper that locks the unlinked file
        # after us finds no folder instead of an empty one to remove twice.
        os.unlink(folder / LOCK)
        os.rmdir(folder)
    finally:
        os.close(fd)
    if moved:
        log.warning(
            "embedded broker: %d unacknowledged message(s) of dead consumer %s back on the queue",
            len(moved),
            folder.name,
            extra={"event": "embedded_broker_reaped"},
        )
    return len(moved)


class QoS(virtual.QoS):
    """kombu's QoS, with ack and reject acting on the claimed file."""

    def ack(self, delivery_tag: str) -> None:
        self.channel.settle(delivery_tag)
        super().ack(delivery_tag)

    def reject(self, delivery_tag: str, requeue: bool = False) -> None:
        if not requeue:
            self.channel.settle(delivery_tag)
        super().reject(delivery_tag, requeue=requeue)  # requeue: Channel._restore_at_beginning


class Channel(filesystem.Channel):
    """kombu's filesystem channel, claiming by rename instead of deleting on read."""

    QoS = QoS

    def __init__(self, connection: Any, **kwargs: Any) -> None:
        super().__init__(connection, **kwargs)
        # Resolved now (kombu restores unacked messages at close, after dropping the connection),
        # and absolute: the unacked folder names this process's holder whatever the working directory.
        self.queue_folder = Path(self.data_folder_in).absolute()
        options = self.transport_options
        self.unacked_root = Path(options.get("unacked_folder") or self.queue_folder.parent / "unacked").absolute()
        self.bad_folder = Path(options.get("bad_folder") or self.queue_folder.parent / "bad").absolute()
        self._processed = Path(self.processed_folder) if self.store_processed else None
        # Queues consumed without acks (kombu's pidbox, for one): delivered means done.
        self._no_ack_queues: set[str] = set()
        self._next_reap = time.monotonic() + REAP_INTERVAL
        reap(self.unacked_root, self.queue_folder)

    # -- publishing --------------------------------------------------------
    # kombu's two bases name the second parameter differently (message, payload): one has to differ.
    def _put(self, queue: str, payload: dict[str, Any], **kwargs: Any) -> None:  # type: ignore[override]
        # kombu's name (readers take files in name order, the millisecond first), with a
        # sequence number before the random part so that one producer's messages keep their
        # order within a millisecond too.
        name = f"{round(time.monotonic() * 1000)}_{next(_sequence):012d}-{uuid.uuid4().hex}.{queue}.msg"
        folder = Path(self.data_folder_out)
        # Readers match "<stamp>.<queue>.msg" only, so the dot-led partial file is invisible to them.
        partial = folder / f".{name}.part"
        try:
            with open(partial, "wb") as f:
                f.write(str_to_bytes(dumps(payload)))
            os.rename(partial, folder / name)
        except OSError as exc:
            partial.unlink(missing_ok=True)
            raise ChannelError(f"Cannot add message {name!r} to {folder}") from exc

    # -- consuming ---------------------------------------------------------
    def _get(self, queue: str, timeout: float | None = None) -> dict[str, Any]:
        now = time.monotonic()
        if now >= self._next_reap:
            self._next_reap = now + REAP_INTERVAL
            reap(self.unacked_root, self.queue_folder)
        wanted = f"{queue}.msg"
        for name in sorted(os.listdir(self.queue_folder)):
            if name.partition(".")[2] != wanted:
                continue
            payload = self._claim(queue, name)
            if payload is not None:
                return payload
        raise Empty()

    def _claim(self, queue: str, name: str) -> dict[str, Any] | None:
        held = _holder(self.unacked_root)
        claimed = held.folder / name
        try:
            os.rename(self.queue_folder / name, claimed)
        except FileNotFoundError:
            if not held.folder.is_dir():
                raise ChannelError(f"this process's unacked folder {held.folder} was removed") from None
            return None  # another consumer took it first
        payload = self._read(claimed)
        if payload is None:
            return None
        # A tag per delivery, not kombu's per message: a message given back and taken again
        # must not be settled by a late ack of its earlier delivery.
        tag = uuid.uuid4().hex
        payload["properties"]["delivery_tag"] = tag
        held.claims[tag] = claimed
        if queue in self._no_ack_queues:
            self.settle(tag)
        return payload

    def _read(self, claimed: Path) -> dict[str, Any] | None:
        """The claimed file's message; None when it was put back (still being written) or set aside in bad/."""
        with open(claimed, "rb") as f:
            # A plain kombu producer holds LOCK_EX on its file while it writes it.
            fcntl.flock(f, fcntl.LOCK_SH)
            raw = f.read()
            age = time.time() - os.fstat(f.fileno()).st_mtime
        try:
            payload = loads(bytes_to_str(raw))
            if isinstance(payload, dict) and isinstance(payload.get("properties"), dict):
                return payload
            problem = "not a kombu message"
        except ValueError as exc:
            problem = str(exc)
        if not raw and age < WRITER_GRACE:
            os.rename(claimed, self.queue_folder / claimed.name)
            return None
        self.bad_folder.mkdir(parents=True, exist_ok=True)
        os.rename(claimed, self.bad_folder / claimed.name)
        log.error(
            "embedded broker: message %s does not parse (%s); kept in %s",
            claimed.name,
            problem,
            self.bad_folder,
            extra={"event": "embedded_broker_bad_message"},
        )
        return None

    # -- settling ----------------------------------------------------------
    def settle(self, delivery_tag: str) -> None:
        """The delivery is done with (acked, rejected, or taken without ack): its file goes."""
        claimed = _claims(self.unacked_root).pop(delivery_tag, None)
        if claimed is None:
            return  # settled or given back already, or claimed by the parent before a fork
        if self._processed is not None:
            os.rename(claimed, self._processed / claimed.name)
        else:
            os.unlink(claimed)

    def _restore(self, message: Any) -> None:
        claimed = _claims(self.unacked_root).pop(message.delivery_tag, None)
        if claimed is None:
            # kombu restores at close what it had not seen acked; an ack from another thread
            # may have won the race. Re-putting a copy, as kombu does, would run it twice.
            return
        # Back under its own name: the message keeps its place in the queue, and it is the
        # same file, so there is never a second copy.
        os.rename(claimed, self.queue_folder / claimed.name)

    _restore_at_beginning = _restore

    # -- consumers without acks ------------------------------------------------
    def basic_consume(self, queue: str, no_ack: bool, *args: Any, **kwargs: Any) -> Any:
        if no_ack:
            self._no_ack_queues.add(queue)
        return super().basic_consume(queue, no_ack, *args, **kwargs)

    def basic_cancel(self, consumer_tag: str) -> Any:
        queue = self._tag_to_queue.get(consumer_tag)
        result = super().basic_cancel(consumer_tag)
        self._no_ack_queues.discard(queue)
        return result

    def basic_get(self, queue: str, no_ack: bool = False, **kwargs: Any) -> Any:
        message = super().basic_get(queue, no_ack=no_ack, **kwargs)
        if message is not None and no_ack:
            self.settle(message.delivery_tag)
        return message


class Transport(filesystem.Transport):
    """kombu's filesystem transport with redelivery of what a dead consumer held."""

    Channel = Channel
    # Exchanges and bindings of this transport, apart from the plain one's in the same process.
    global_state = virtual.BrokerState()
