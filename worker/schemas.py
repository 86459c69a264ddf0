"""Validation rules for kling-image-o1, in one place (see shared/modellix-api.md).

The Celery task, the CLI and the sandbox server all validate through these
schemas; nothing else restates the rules.
"""

from __future__ import annotations

import base64
import binascii
import copy
import hashlib
import json
import re
from typing import Any
from urllib.parse import urlsplit

from marshmallow import (
    RAISE,
    Schema,
    ValidationError,
    fields,
    missing,
    validate,
    validates,
    validates_schema,
)

from models.job import DEFAULT_PRIORITY, DEFAULT_TENANT

MAX_PROMPT_CHARS = 2500
MAX_ITEMS = 10
MAX_IMAGE_BYTES = 10 * 1024 * 1024
MAX_METADATA_BYTES = 4096
RESOLUTIONS = ("1k", "2k")
ASPECT_RATIOS = ("16:9", "9:16", "1:1", "4:3", "3:4", "3:2", "2:3", "21:9", "auto")
# \Z, not $: "$" also matches before a trailing newline, and validate.Regexp uses match().
JOB_ID_PATTERN = re.compile(r"^[A-Za-z0-9._:-]{1,64}\Z")
TENANT_PATTERN = re.compile(r"^[A-Za-z0-9._-]{1,64}\Z")

_DATA_URI = re.compile(r"^data:image/(jpeg|jpg|png);base64,(.*)$", re.DOTALL)
_REFERENCE = re.compile(r"<<<image_(\d+)>>>")
_MAGIC = {"png": b"\x89PNG\r\n\x1a\n", "jpeg": b"\xff\xd8\xff"}


def is_valid_job_id(value: object) -> bool:
    return isinstance(value, str) and JOB_ID_PATTERN.match(value) is not None


def _check_data_uri(value: str) -> None:
    match = _DATA_URI.match(value)
    if not match:
        raise ValidationError("inline images must be data:image/jpeg;base64,... or data:image/png;base64,...")
    kind, payload = ("jpeg" if match[1] == "jpg" else match[1]), match[2]
    # Size first, from the base64 length: no point decoding 50 MB to refuse it.
    if len(payload) * 3 // 4 - payload[-2:].count("=") > MAX_IMAGE_BYTES:
        raise ValidationError(f"inline image is larger than {MAX_IMAGE_BYTES // (1024 * 1024)} MB")
    try:
        data = base64.b64decode(payload, validate=True)
    except (binascii.Error, ValueError):
        raise ValidationError("inline image is not valid base64") from None
    if not data.startswith(_MAGIC[kind]):
        real = next((k for k, magic in _MAGIC.items() if data.startswith(magic)), None)
        raise ValidationError(
            f"inline image is declared {kind} but is " + (f"a {real}" if real else "neither a JPEG nor a PNG")
        )


def _check_image(value: str) -> None:
    if value.startswith("data:"):
        return _check_data_uri(value)
    try:
        parts = urlsplit(value)
        ok = parts.scheme in ("http", "https") and bool(parts.hostname)
    except ValueError:  # e.g. "http://[::1": urlsplit raises rather than returning junk
        ok = False
    # Whitespace would only fail later, at Modellix, with a vaguer message.
    if not ok or re.search(r"\s", value):
        raise ValidationError("must be an http(s) URL or a base64 data URI of a JPEG or PNG")


class StrictInt(fields.Integer):
    """JSON integers only: no bools (True is an int in Python), floats or strings."""

    def __init__(self, **kwargs: Any):
        super().__init__(strict=True, **kwargs)

    def _validated(self, value: Any) -> int:
        if isinstance(value, bool):
            raise self.make_error("invalid")
        return super()._validated(value)


class Unsupported(fields.Field[Any]):
    """A parameter of other Kling models: named in the error rather than "Unknown field.".

    A field (not a load() override) so that Schema.validate(), which the sandbox
    uses, reports it the same way, together with every other error.
    """

    def deserialize(self, value: Any, attr: str | None = None, data: Any = None, **kwargs: Any) -> Any:
        if value is missing:
            return missing
        raise ValidationError("not supported by kling-image-o1")


class ImageSchema(Schema):
    class Meta:
        unknown = RAISE

    image = fields.String(required=True, validate=_check_image)


class ElementSchema(Schema):
    class Meta:
        unknown = RAISE

    element_id = StrictInt(
        required=True,
        validate=validate.Range(-(2**63), 2**63 - 1, error="must be a 64-bit signed integer (-2**63 to 2**63-1)"),
    )


class GenerationRequestSchema(Schema):
    class Meta:
        unknown = RAISE

    prompt = fields.String(
        required=True,
        validate=validate.Length(1, MAX_PROMPT_CHARS, error=f"must be 1 to {MAX_PROMPT_CHARS} characters"),
    )
    image_list = fields.List(
        fields.Nested(ImageSchema), validate=validate.Length(max=MAX_ITEMS, error=f"at most {MAX_ITEMS} images")
    )
    element_list = fields.List(
        fields.Nested(ElementSchema), validate=validate.Length(max=MAX_ITEMS, error=f"at most {MAX_ITEMS} elements")
    )
    resolution = fields.String(validate=validate.OneOf(RESOLUTIONS))
    aspect_ratio = fields.String(validate=validate.OneOf(ASPECT_RATIOS))
    n = StrictInt(validate=validate.Range(1, 9, error="must be 1 to 9"))

    negative_prompt = Unsupported()
    image = Unsupported()
    image_reference = Unsupported()
    image_fidelity = Unsupported()
    human_fidelity = Unsupported()
    subject_image_list = Unsupported()
    scene_image = Unsupported()
    style_image = Unsupported()

    @validates("prompt")
    def _prompt_not_blank(self, value: str, **_: Any) -> None:
        if not value.strip():
            raise ValidationError("must not be blank")

    # Counts come from the original input, so that one bad image does not also
    # produce a misleading "<<<image_2>>> refers beyond 1 image" on the prompt.
    @validates_schema(pass_original=True, skip_on_field_errors=False)
    def _cross_field(self, data: dict[str, Any], original: Any, **_: Any) -> None:
        if not isinstance(original, dict):  # already refused as "Invalid input type."
            return

        def count(name: str) -> int:
            value = original.get(name)
            return len(value) if isinstance(value, list) else 0

        errors: dict[str, list[str]] = {}
        total = count("image_list") + count("element_list")
        if total > MAX_ITEMS:
            limit = f"image_list and element_list together may hold at most {MAX_ITEMS} items"
            errors["_schema"] = [f"{limit}; got {total}"]
        prompt, images = original.get("prompt"), count("image_list")
        if isinstance(prompt, str):
            bad = sorted({int(k) for k in _REFERENCE.findall(prompt) if not 1 <= int(k) <= images})
            if bad:
                refs = ", ".join(f"<<<image_{k}>>>" for k in bad)
                allowed = {0: "there is none", 1: "only <<<image_1>>> exists"}.get(
                    images, f"only <<<image_1>>> to <<<image_{images}>>> exist"
                )
                errors["prompt"] = [f"{refs} does not match an image: image_list has {images} image(s), so {allowed}"]
        if errors:
            raise ValidationError(errors)


def _check_metadata(value: Any) -> None:
    try:
        # allow_nan=False: NaN/Infinity are not JSON and would break other readers.
        size = len(json.dumps(value, separators=(",", ":"), ensure_ascii=False, allow_nan=False).encode())
    except (TypeError, ValueError):
        raise ValidationError("must be JSON-serialisable") from None
    if size > MAX_METADATA_BYTES:
        raise ValidationError(f"is {size} bytes as compact JSON; at most {MAX_METADATA_BYTES}")


# A Celery task or queue name for a callback: what a producer's own app would declare.
_CELERY_NAME = re.compile(r"^[A-Za-z0-9_.:@-]{1,200}$")


class CallbackSchema(Schema):
    """Where a Celery service wants its event: the task `task` is sent to `queue` with kwargs {"event": EVENT}."""

    class Meta:
        unknown = RAISE

    task = fields.String(required=True, validate=validate.Regexp(_CELERY_NAME, error="must be a Celery task name"))
    queue = fields.String(required=True, validate=validate.Regexp(_CELERY_NAME, error="must be a queue name"))


class MessageSchema(Schema):
    """The keyword arguments of a `kling.generate` message."""

    class Meta:
        unknown = RAISE

    # Only the type here: the body itself is GenerationRequestSchema's job, so a
    # bad body can still be recorded as a rejected job under its job_id.
    request = fields.Dict(required=True)
    job_id = fields.String(
        load_default=None,
        allow_none=True,
        validate=validate.Regexp(JOB_ID_PATTERN, error="must be 1-64 characters of [A-Za-z0-9._:-]"),
    )
    metadata = fields.Dict(keys=fields.String(), load_default=None, allow_none=True, validate=_check_metadata)
    # Told when the job ends (worker.results.delivery): a signed POST of its event, and/or a Celery task.
    webhook = fields.Url(
        load_default=None,
        allow_none=True,
        schemes={"http", "https"},
        require_tld=False,
        validate=validate.Length(max=2048),
    )
    callback = fields.Nested(CallbackSchema, load_default=None, allow_none=True)
    # Whose job it is, and its priority within that tenant's line (worker.fleet.share).
    tenant = fields.String(
        load_default=DEFAULT_TENANT,
        validate=validate.Regexp(TENANT_PATTERN, error="must be 1-64 characters of [A-Za-z0-9._-]"),
    )
    priority = fields.Integer(
        load_default=DEFAULT_PRIORITY,
        strict=True,
        validate=validate.Range(min=0, max=9, error="must be a whole number from 0 (last) to 9 (first)"),
    )
    # The job this one retries (set by `kling-worker jobs retry`), recorded in the job's retry_of column.
    retry_of = fields.String(
        load_default=None,
        allow_none=True,
        validate=validate.Regexp(JOB_ID_PATTERN, error="must be a job id: 1-64 characters of [A-Za-z0-9._:-]"),
    )


def errors_line(messages: Any, path: str = "") -> str:
    """Marshmallow's nested error messages as one line: `request.n: must be 1 to 9; job_id: ...`."""
    if isinstance(messages, dict):
        parts = []
        for key, value in messages.items():
            where = path if key == "_schema" else f"{path}.{key}" if path else str(key)
            parts.append(errors_line(value, where))
        return "; ".join(parts)
    if isinstance(messages, list) and all(isinstance(m, str) for m in messages):
        text = " ".join(messages)
        return f"{path}: {text}" if path else text
    if isinstance(messages, list):
        return "; ".join(errors_line(m, path) for m in messages)
    return f"{path}: {messages}" if path else str(messages)


def redact_request(request: dict[str, Any]) -> dict[str, Any]:
    """A copy with inline images replaced by digest and size: the database keeps no blobs.

    Meant for validated requests, but never raises on bad base64: a blob must not
    reach the database just because it was also malformed.
    """
    redacted = copy.deepcopy(request)
    for item in redacted.get("image_list") or []:
        value = item.get("image") if isinstance(item, dict) else None
        match = _DATA_URI.match(value) if isinstance(value, str) else None
        if match:
            try:
                data = base64.b64decode(match[2], validate=True)
            except (binascii.Error, ValueError):
                data = match[2].encode()
            item["image"] = f"data:image/{match[1]};sha256={hashlib.sha256(data).hexdigest()};bytes={len(data)}"
    return redacted
