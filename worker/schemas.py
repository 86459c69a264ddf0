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

from marshmallow import RAISE, Schema, ValidationError, fields, validate, validates, validates_schema

MAX_ITEMS = 10
MAX_IMAGE_BYTES = 10 * 1024 * 1024
MAX_METADATA_BYTES = 4096
ASPECT_RATIOS = ("16:9", "9:16", "1:1", "4:3", "3:4", "3:2", "2:3", "21:9", "auto")
UNSUPPORTED = ("negative_prompt", "image", "image_reference", "image_fidelity", "human_fidelity",
               "subject_image_list", "scene_image", "style_image")
JOB_ID_PATTERN = re.compile(r"^[A-Za-z0-9._:-]{1,64}$")

_DATA_URI = re.compile(r"^data:image/(jpeg|jpg|png);base64,(.*)$", re.DOTALL)
_REFERENCE = re.compile(r"<<<image_(\d+)>>>")
_MAGIC = {"png": b"\x89PNG\r\n\x1a\n", "jpeg": b"\xff\xd8\xff"}


def is_valid_job_id(value: object) -> bool:
    return isinstance(value, str) and JOB_ID_PATTERN.match(value) is not None


def decode_data_uri(value: str) -> tuple[str, bytes] | None:
    """(format, bytes) of a JPEG/PNG data URI; None if `value` is not a data URI at all."""
    match = _DATA_URI.match(value)
    if not match:
        return None
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
        raise ValidationError(f"inline image is declared {kind} but is "
                              + (f"a {real}" if real else "neither a JPEG nor a PNG"))
    return kind, data


def _image(value: str) -> None:
    if value.startswith("data:"):
        if decode_data_uri(value) is None:
            raise ValidationError("inline images must be data:image/jpeg;base64,... or data:image/png;base64,...")
        return
    parts = urlsplit(value)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise ValidationError("must be an http(s) URL or a base64 data URI of a JPEG or PNG")


class StrictInt(fields.Integer):
    """JSON integers only: no bools (True is an int in Python), floats or strings."""

    def __init__(self, **kwargs: Any):
        super().__init__(strict=True, **kwargs)

    def _validated(self, value: Any) -> int:
        if isinstance(value, bool):
            raise self.make_error("invalid")
        return super()._validated(value)


class ImageSchema(Schema):
    class Meta:
        unknown = RAISE

    image = fields.String(required=True, validate=_image)


class ElementSchema(Schema):
    class Meta:
        unknown = RAISE

    element_id = StrictInt(required=True, validate=validate.Range(-(2**63), 2**63 - 1,
                                                                  error="must be a 64-bit integer"))


class GenerationRequestSchema(Schema):
    class Meta:
        unknown = RAISE

    prompt = fields.String(required=True, validate=validate.Length(1, 2500))
    image_list = fields.List(fields.Nested(ImageSchema), validate=validate.Length(max=MAX_ITEMS))
    element_list = fields.List(fields.Nested(ElementSchema), validate=validate.Length(max=MAX_ITEMS))
    resolution = fields.String(validate=validate.OneOf(("1k", "2k")))
    aspect_ratio = fields.String(validate=validate.OneOf(ASPECT_RATIOS))
    n = StrictInt(validate=validate.Range(1, 9))

    @validates("prompt")
    def _prompt_not_blank(self, value: str, **_: Any) -> None:
        if not value.strip():
            raise ValidationError("must not be blank")

    def load(self, data: Any, **kwargs: Any) -> Any:
        # Name the unsupported fields rather than lumping them in with typos.
        if isinstance(data, dict):
            found = {k: ["not supported by kling-image-o1"] for k in UNSUPPORTED if k in data}
            if found:
                try:
                    super().load({k: v for k, v in data.items() if k not in found}, **kwargs)
                except ValidationError as exc:
                    found.update(exc.normalized_messages())
                raise ValidationError(found)
        return super().load(data, **kwargs)

    @validates_schema(skip_on_field_errors=False)
    def _cross_field(self, data: dict[str, Any], **_: Any) -> None:
        images = data.get("image_list") or []
        total = len(images) + len(data.get("element_list") or [])
        if total > MAX_ITEMS:
            raise ValidationError(f"image_list and element_list hold {total} items together; at most {MAX_ITEMS}",
                                  "_schema")
        prompt = data.get("prompt")
        if isinstance(prompt, str) and isinstance(data.get("image_list", []), list):
            bad = sorted({int(k) for k in _REFERENCE.findall(prompt) if not 1 <= int(k) <= len(images)})
            if bad:
                refs = ", ".join(f"<<<image_{k}>>>" for k in bad)
                raise ValidationError(f"{refs} refers beyond the {len(images)} image(s) in image_list", "prompt")


def _metadata_size(value: Any) -> None:
    try:
        size = len(json.dumps(value, separators=(",", ":"), ensure_ascii=False).encode())
    except (TypeError, ValueError):
        raise ValidationError("must be JSON-serialisable") from None
    if size > MAX_METADATA_BYTES:
        raise ValidationError(f"is {size} bytes as JSON; at most {MAX_METADATA_BYTES}")


class MessageSchema(Schema):
    """The keyword arguments of a `kling.generate` message."""

    class Meta:
        unknown = RAISE

    request = fields.Dict(required=True)
    job_id = fields.String(load_default=None, allow_none=True,
                           validate=validate.Regexp(JOB_ID_PATTERN, error="must be 1-64 characters of [A-Za-z0-9._:-]"))
    metadata = fields.Dict(load_default=None, allow_none=True, validate=_metadata_size)


def redact_request(request: dict[str, Any]) -> dict[str, Any]:
    """A copy with inline images replaced by digest and size: the database keeps no blobs."""
    redacted = copy.deepcopy(request)
    for item in redacted.get("image_list") or []:
        value = item.get("image", "")
        if isinstance(value, str) and value.startswith("data:"):
            decoded = decode_data_uri(value)
            if decoded:
                kind, data = decoded
                item["image"] = f"data:image/{kind};sha256={hashlib.sha256(data).hexdigest()};bytes={len(data)}"
    return redacted
