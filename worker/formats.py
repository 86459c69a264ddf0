"""The two settings whose values are small formats of their own, parsed here with the standard library
only: KLING_ARCHIVE (`ArchiveSpec`: `file:///dir`, `s3://bucket/prefix` or `off`) and
KLING_WEBHOOK_SECRET (`webhook_key`: `whsec_<base64>`).

worker.config checks both values when the settings are made, with these parsers, and
worker.results.archive and worker.results.webhooks use the same ones at work: one parse, and config
imports no module of the service's own. No error message here echoes a password or a secret.
"""

from __future__ import annotations

import base64
import binascii
import os
import re
from dataclasses import dataclass
from urllib.parse import unquote, urlsplit

# An S3 bucket name (the rules every S3-compatible store accepts).
_BUCKET = re.compile(r"^[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]\Z")

SECRET_PREFIX = "whsec_"
# The specification's bounds for a symmetric signing secret: 24 to 64 random bytes.
SECRET_MIN_BYTES = 24
SECRET_MAX_BYTES = 64


@dataclass(frozen=True)
class ArchiveSpec:
    """KLING_ARCHIVE, parsed: `kind` is "file", "s3" or "off"."""

    kind: str
    location: str = ""  # the absolute folder, or the bucket
    prefix: str = ""  # S3 only: the key prefix, without slashes at either end

    @classmethod
    def parse(cls, spec: str) -> ArchiveSpec:
        """Check a KLING_ARCHIVE value; ValueError names what is wrong (never echoing a password)."""
        text = spec.strip()
        if text.lower() == "off":
            return cls("off")
        parts = urlsplit(text)
        if "@" in parts.netloc:
            # Not echoed: the value holds a login. boto3 takes keys from the AWS environment.
            raise ValueError(
                "KLING_ARCHIVE must not hold credentials; set AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY instead"
            )
        usage = f"KLING_ARCHIVE must be file:///absolute/dir, s3://bucket/prefix or off, not {spec!r}"
        if parts.query or parts.fragment:
            raise ValueError(usage)
        if parts.scheme == "file":
            path = unquote(parts.path)
            if parts.netloc not in ("", "localhost") or not path.startswith("/"):
                raise ValueError(f"{usage}: a file:// archive needs an absolute folder (three slashes)")
            return cls("file", os.path.normpath(path))
        if parts.scheme == "s3":
            if not _BUCKET.match(parts.netloc):
                raise ValueError(f"{usage}: {parts.netloc!r} is not an S3 bucket name")
            prefix = parts.path.strip("/")
            if prefix and any(part in ("", ".", "..") for part in prefix.split("/")):
                raise ValueError(f"{usage}: the prefix has an empty, '.' or '..' part")
            return cls("s3", parts.netloc, prefix)
        raise ValueError(usage)


def webhook_key(text: str) -> bytes:
    """The HMAC key of a `whsec_<base64>` webhook secret; the error message never contains the text."""
    if not text.startswith(SECRET_PREFIX):
        raise ValueError(f"a webhook secret must start with {SECRET_PREFIX!r} followed by base64")
    encoded = text[len(SECRET_PREFIX) :]
    try:
        # Strict standard base64 (padding optional): the verification libraries decode
        # leniently, dropping characters outside the alphabet (a URL-safe "-" or "_"),
        # so anything but the plain alphabet would give them a different key from ours.
        key = base64.b64decode(encoded + "=" * (-len(encoded) % 4), validate=True)
    except binascii.Error:
        raise ValueError(f"a webhook secret must be {SECRET_PREFIX!r} followed by standard base64") from None
    return checked_key(key)


def checked_key(key: bytes) -> bytes:
    """`key` if its length is within the specification's bounds, else ValueError (saying only its length)."""
    if not SECRET_MIN_BYTES <= len(key) <= SECRET_MAX_BYTES:
        raise ValueError(f"a webhook secret must decode to {SECRET_MIN_BYTES}-{SECRET_MAX_BYTES} bytes, not {len(key)}")
    return key
