"""Every rule of shared/modellix-api.md, at its boundaries."""

from __future__ import annotations

import base64
import copy
import hashlib
import struct
import zlib

import pytest
from marshmallow import ValidationError

from worker.schemas import (
    JOB_ID_PATTERN,
    GenerationRequestSchema,
    MessageSchema,
    errors_line,
    is_valid_job_id,
    redact_request,
)

# Restated from the API contract on purpose: the tests check the schema against
# the document, not against the schema's own constants.
ASPECT_RATIOS = ["16:9", "9:16", "1:1", "4:3", "3:4", "3:2", "2:3", "21:9", "auto"]
UNSUPPORTED = [
    "negative_prompt",
    "image",
    "image_reference",
    "image_fidelity",
    "human_fidelity",
    "subject_image_list",
    "scene_image",
    "style_image",
]
TEN_MB = 10 * 1024 * 1024


def make_png(width: int = 2, height: int = 2) -> bytes:
    def chunk(kind: bytes, data: bytes) -> bytes:
        return struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))

    rows = b"".join(b"\x00" + b"\x10\x20\x30" * width for _ in range(height))
    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header) + chunk(b"IDAT", zlib.compress(rows)) + chunk(b"IEND", b"")


PNG = make_png()
# No JPEG encoder without Pillow: SOI + JFIF APP0 segment + EOI, which is what the
# schema inspects (the magic), not a decodable picture.
JPEG = b"\xff\xd8\xff\xe0" + struct.pack(">H", 16) + b"JFIF\x00\x01\x01\x00\x00\x01\x00\x01\x00\x00" + b"\xff\xd9"


def data_uri(kind: str, data: bytes) -> str:
    return f"data:image/{kind};base64,{base64.b64encode(data).decode()}"


def errors(body: object) -> dict:
    with pytest.raises(ValidationError) as info:
        GenerationRequestSchema().load(body)
    # validate() must report the same errors: the sandbox uses it.
    assert GenerationRequestSchema().validate(body) == info.value.messages
    return info.value.messages


def ok(body: dict) -> dict:
    return GenerationRequestSchema().load(body)


def images(k: int) -> list[dict]:
    return [{"image": f"https://img.example/{i}.png"} for i in range(k)]


def elements(k: int) -> list[dict]:
    return [{"element_id": i} for i in range(k)]


# -- output shape -----------------------------------------------------------


def test_minimal_request_loads_without_injected_defaults():
    assert ok({"prompt": "hi"}) == {"prompt": "hi"}


def test_full_request_comes_back_as_plain_data():
    body = {
        "prompt": "a <<<image_1>>>",
        "image_list": images(1),
        "element_list": elements(1),
        "resolution": "2k",
        "aspect_ratio": "auto",
        "n": 3,
    }
    assert ok(copy.deepcopy(body)) == body


def test_request_must_be_an_object():
    assert "_schema" in errors(["prompt"])


# -- prompt -----------------------------------------------------------------


@pytest.mark.parametrize(
    "prompt, valid",
    [
        ("", False),
        ("   ", False),
        ("\n\t", False),
        ("a", True),
        ("a" * 2500, True),
        ("a" * 2501, False),
        ("猫" * 2500, True),
        ("猫" * 2501, False),  # characters, not UTF-8 bytes (7500 bytes pass)
    ],
)
def test_prompt_length_in_characters(prompt, valid):
    if valid:
        assert ok({"prompt": prompt})["prompt"] == prompt
    else:
        assert "prompt" in errors({"prompt": prompt})


def test_prompt_messages_are_precise():
    assert errors({"prompt": "a" * 2501})["prompt"] == ["must be 1 to 2500 characters"]
    assert errors({"prompt": "  "})["prompt"] == ["must not be blank"]


def test_prompt_is_required_and_a_string():
    assert errors({}) == {"prompt": ["Missing data for required field."]}
    assert "prompt" in errors({"prompt": 5})
    assert "prompt" in errors({"prompt": None})


# -- n, resolution, aspect_ratio ------------------------------------------------


@pytest.mark.parametrize(
    "n, valid",
    [
        (0, False),
        (1, True),
        (9, True),
        (10, False),
        (-1, False),
        (True, False),
        (False, False),
        (2.0, False),
        (1.5, False),
        ("3", False),
        (None, False),
    ],
)
def test_n(n, valid):
    if valid:
        assert ok({"prompt": "x", "n": n})["n"] == n
    else:
        assert "n" in errors({"prompt": "x", "n": n})


@pytest.mark.parametrize("ratio", ASPECT_RATIOS)
def test_every_aspect_ratio(ratio):
    assert ok({"prompt": "x", "aspect_ratio": ratio})["aspect_ratio"] == ratio


@pytest.mark.parametrize("value", ["1k", "2k"])
def test_resolutions(value):
    assert ok({"prompt": "x", "resolution": value})["resolution"] == value


@pytest.mark.parametrize(
    "field, value",
    [
        ("aspect_ratio", "5:4"),
        ("aspect_ratio", "AUTO"),
        ("aspect_ratio", ""),
        ("resolution", "4k"),
        ("resolution", "1K"),
        ("resolution", 1),
    ],
)
def test_enumerations_reject_others(field, value):
    assert field in errors({"prompt": "x", field: value})


# -- lists --------------------------------------------------------------------


def test_each_list_holds_at_most_ten():
    assert len(ok({"prompt": "x", "image_list": images(10)})["image_list"]) == 10
    assert len(ok({"prompt": "x", "element_list": elements(10)})["element_list"]) == 10
    assert errors({"prompt": "x", "image_list": images(11)})["image_list"] == ["at most 10 images"]
    assert errors({"prompt": "x", "element_list": elements(11)})["element_list"] == ["at most 10 elements"]


def test_both_lists_together_hold_at_most_ten():
    assert ok({"prompt": "x", "image_list": images(5), "element_list": elements(5)})
    assert ok({"prompt": "x", "image_list": images(10), "element_list": []})
    found = errors({"prompt": "x", "image_list": images(6), "element_list": elements(5)})
    assert found == {"_schema": ["image_list and element_list together may hold at most 10 items; got 11"]}


@pytest.mark.parametrize(
    "value, valid",
    [
        (0, True),
        (2**63 - 1, True),
        (-(2**63), True),
        (2**63, False),
        (-(2**63) - 1, False),
        ("12", False),
        (1.5, False),
        (3.0, False),
        (True, False),
        (None, False),
    ],
)
def test_element_id_is_a_64_bit_integer(value, valid):
    body = {"prompt": "x", "element_list": [{"element_id": value}]}
    if valid:
        assert ok(body)["element_list"] == [{"element_id": value}]
    else:
        assert "element_id" in errors(body)["element_list"][0]


def test_list_items_take_exactly_their_one_key():
    assert errors({"prompt": "x", "image_list": [{"image": "https://a/b.png", "weight": 1}]}) == {
        "image_list": {0: {"weight": ["Unknown field."]}}
    }
    assert "element_list" in errors({"prompt": "x", "element_list": [{"element_id": 1, "name": "a"}]})
    assert "image_list" in errors({"prompt": "x", "image_list": [{}]})
    assert "element_list" in errors({"prompt": "x", "element_list": [{}]})
    assert "image_list" in errors({"prompt": "x", "image_list": ["https://a/b.png"]})
    assert "image_list" in errors({"prompt": "x", "image_list": "https://a/b.png"})


# -- unsupported and unknown fields ---------------------------------------------


@pytest.mark.parametrize("field", UNSUPPORTED)
def test_unsupported_fields_are_named(field):
    for value in ("anything", None, [], 0):
        assert errors({"prompt": "x", field: value}) == {field: ["not supported by kling-image-o1"]}


def test_unsupported_and_other_errors_are_reported_together():
    found = errors({"prompt": "", "negative_prompt": "blur", "n": 11, "seed": 1})
    assert set(found) == {"prompt", "negative_prompt", "n", "seed"}


def test_unknown_field():
    assert errors({"prompt": "x", "seed": 1}) == {"seed": ["Unknown field."]}


# -- images -------------------------------------------------------------------


@pytest.mark.parametrize(
    "url, valid",
    [
        ("http://img.example/a.png", True),
        ("https://img.example/a", True),
        ("HTTPS://img.example/a?x=1", True),
        ("https://10.0.0.1:8443/a.jpg", True),
        ("ftp://img.example/a.png", False),
        ("file:///etc/passwd", False),
        ("javascript:alert(1)", False),
        ("not a url", False),
        ("/relative/a.png", False),
        ("img.example/a.png", False),
        ("https:///no-host.png", False),
        ("http://", False),
        ("http://[::1", False),
        ("https://img.example/a b.png", False),
        ("", False),
        ("data:text/plain;base64,aGk=", False),
    ],
)
def test_image_urls(url, valid):
    body = {"prompt": "x", "image_list": [{"image": url}]}
    if valid:
        assert ok(body)["image_list"] == [{"image": url}]
    else:
        assert "image" in errors(body)["image_list"][0]


def test_real_png_and_jpeg_inline_images():
    inline = [{"image": data_uri("png", PNG)}, {"image": data_uri("jpeg", JPEG)}, {"image": data_uri("jpg", JPEG)}]
    assert ok({"prompt": "x", "image_list": inline})["image_list"] == inline


@pytest.mark.parametrize(
    "bad, why",
    [
        ("data:image/png;base64,@@not base64@@", "not valid base64"),
        ("data:image/png;base64,iVBORw0KGgo", "not valid base64"),  # missing padding
        (data_uri("png", PNG)[:-1] + "\n", "not valid base64"),
        (data_uri("png", PNG)[:30] + "*" + data_uri("png", PNG)[30:], "not valid base64"),  # a stray character
        (data_uri("png", b"GIF89a" + b"\x00" * 20), "declared png but is neither a JPEG nor a PNG"),
        (data_uri("jpeg", b"hello world"), "declared jpeg but is neither a JPEG nor a PNG"),
        (data_uri("png", b""), "neither a JPEG nor a PNG"),
        (data_uri("png", JPEG), "declared png but is a jpeg"),
        (data_uri("jpeg", PNG), "declared jpeg but is a png"),
        (data_uri("gif", b"GIF89a"), "data:image/jpeg;base64"),
        ("data:image/png," + "x", "data:image/jpeg;base64"),
    ],
)
def test_inline_images_must_be_real_png_or_jpeg(bad, why):
    message = errors({"prompt": "x", "image_list": [{"image": bad}]})["image_list"][0]["image"][0]
    assert why in message, message


def test_inline_image_size_limit():
    at_limit = PNG + b"\x00" * (TEN_MB - len(PNG))
    assert ok({"prompt": "x", "image_list": [{"image": data_uri("png", at_limit)}]})
    over = errors({"prompt": "x", "image_list": [{"image": data_uri("png", at_limit + b"\x00")}]})
    assert over == {"image_list": {0: {"image": ["inline image is larger than 10 MB"]}}}


# -- prompt references ------------------------------------------------------------


@pytest.mark.parametrize(
    "prompt, count, valid",
    [
        ("<<<image_1>>>", 1, True),
        ("<<<image_2>>>", 1, False),
        ("<<<image_2>>> and <<<image_1>>>", 2, True),
        ("<<<image_10>>>", 10, True),
        ("<<<image_11>>>", 10, False),
        ("<<<image_0>>>", 1, False),
        ("<<<image_1>>>", 0, False),
        ("no reference", 0, True),
    ],
)
def test_prompt_references_stay_within_the_images(prompt, count, valid):
    body: dict = {"prompt": prompt}
    if count:
        body["image_list"] = images(count)
    if valid:
        assert ok(body)
    else:
        assert "<<<image_" in errors(body)["prompt"][0]


def test_prompt_reference_message_names_the_reference_and_the_count():
    message = errors({"prompt": "<<<image_3>>> <<<image_0>>>", "image_list": images(2)})["prompt"][0]
    assert "<<<image_0>>>, <<<image_3>>>" in message and "2 image(s)" in message
    message = errors({"prompt": "<<<image_1>>>"})["prompt"][0]
    assert "0 image(s)" in message


def test_a_bad_image_does_not_shift_the_reference_count():
    found = errors({"prompt": "<<<image_2>>>", "image_list": [{"image": "https://a/b"}, {"image": "ftp://x"}]})
    assert set(found) == {"image_list"}


# -- message --------------------------------------------------------------------


def message_errors(kwargs: dict) -> dict:
    return MessageSchema().validate(kwargs)


@pytest.mark.parametrize(
    "job_id, valid",
    [
        ("a", True),
        ("A-z_0.9:x", True),
        ("x" * 64, True),
        ("x" * 65, False),
        ("", False),
        ("has space", False),
        ("a/b", False),
        ("ü", False),
        ("abc\n", False),
        (7, False),
        (None, True),
    ],
)
def test_message_job_id(job_id, valid):
    assert (not message_errors({"request": {}, "job_id": job_id})) is valid
    assert is_valid_job_id(job_id) is (valid and job_id is not None)
    if isinstance(job_id, str):
        assert (JOB_ID_PATTERN.match(job_id) is not None) is valid


def test_message_defaults():
    assert MessageSchema().load({"request": {"prompt": "x"}}) == {
        "request": {"prompt": "x"},
        "job_id": None,
        "metadata": None,
        "webhook": None,
        "callback": None,
        "retry_of": None,
        "tenant": "default",
        "priority": 5,
    }


@pytest.mark.parametrize(
    "tenant, error",
    [
        ("web-shop.eu_1", None),
        ("x" * 64, None),
        ("x" * 65, "must be 1-64 characters of [A-Za-z0-9._-]"),
        ("", "must be 1-64 characters of [A-Za-z0-9._-]"),
        ("a b", "must be 1-64 characters of [A-Za-z0-9._-]"),
        ("a:b", "must be 1-64 characters of [A-Za-z0-9._-]"),
        ("web\n", "must be 1-64 characters of [A-Za-z0-9._-]"),
        (7, "Not a valid string."),
        (None, "Field may not be null."),
    ],
)
def test_a_tenant_is_a_short_plain_name(tenant, error):
    message = {"request": {"prompt": "x"}, "tenant": tenant}
    if error is None:
        assert MessageSchema().load(message)["tenant"] == tenant
    else:
        with pytest.raises(ValidationError) as caught:
            MessageSchema().load(message)
        assert caught.value.messages == {"tenant": [error]}


@pytest.mark.parametrize(
    "priority, error",
    [
        (0, None),
        (9, None),
        (10, "must be a whole number from 0 (last) to 9 (first)"),
        (-1, "must be a whole number from 0 (last) to 9 (first)"),
        ("9", "Not a valid integer."),
        (4.5, "Not a valid integer."),
        (True, "Not a valid integer."),
        (None, "Field may not be null."),
    ],
)
def test_a_priority_is_a_whole_number_from_0_to_9(priority, error):
    message = {"request": {"prompt": "x"}, "priority": priority}
    if error is None:
        assert MessageSchema().load(message)["priority"] == priority
    else:
        with pytest.raises(ValidationError) as caught:
            MessageSchema().load(message)
        assert caught.value.messages == {"priority": [error]}


@pytest.mark.parametrize(
    "retry_of, valid", [("order-1", True), (None, True), ("a b", False), ("x" * 65, False), (7, False)]
)
def test_a_message_may_name_the_job_it_retries(retry_of, valid):
    assert (not message_errors({"request": {}, "retry_of": retry_of})) is valid


def test_a_message_may_ask_for_a_webhook_and_a_callback():
    loaded = MessageSchema().load(
        {
            "request": {"prompt": "x"},
            "webhook": "https://hooks.example.com/kling?x=1",
            "callback": {"task": "images.ready", "queue": "images"},
        }
    )
    assert loaded["webhook"] == "https://hooks.example.com/kling?x=1"
    assert loaded["callback"] == {"task": "images.ready", "queue": "images"}
    assert MessageSchema().load({"request": {}, "webhook": "http://receiver:8080/hook"})["webhook"]


@pytest.mark.parametrize(
    "extra, field",
    [
        ({"webhook": "ftp://example.com/x"}, "webhook"),
        ({"webhook": "not a url"}, "webhook"),
        ({"webhook": "https://example.com/" + "a" * 2100}, "webhook"),
        ({"callback": {"task": "x"}}, "callback"),
        ({"callback": {"task": "x", "queue": "q", "extra": 1}}, "callback"),
        ({"callback": {"task": "bad name!", "queue": "q"}}, "callback"),
        ({"callback": "tasks.done"}, "callback"),
    ],
)
def test_a_malformed_webhook_or_callback_makes_the_message_invalid(extra, field):
    with pytest.raises(ValidationError) as info:
        MessageSchema().load({"request": {"prompt": "x"}, **extra})
    assert field in info.value.messages


def test_message_metadata_size_in_utf8_bytes():
    base = len('{"k":""}')
    assert not message_errors({"request": {}, "metadata": {"k": "a" * (4096 - base)}})
    assert message_errors({"request": {}, "metadata": {"k": "a" * (4097 - base)}}) == {
        "metadata": ["is 4097 bytes as compact JSON; at most 4096"]
    }
    # 2 bytes each in UTF-8: 2044 characters are 4088 bytes, plus 8 is over.
    assert "metadata" in message_errors({"request": {}, "metadata": {"k": "é" * 2045}})
    assert not message_errors({"request": {}, "metadata": None})


@pytest.mark.parametrize("metadata", [["a", "list"], "text", {"k": float("nan")}, {"k": {1, 2}}, {1: "int key"}])
def test_message_metadata_must_be_a_json_object(metadata):
    assert "metadata" in message_errors({"request": {}, "metadata": metadata})


def test_message_request_and_unknown_kwargs():
    assert "request" in message_errors({"request": "text"})
    assert "request" in message_errors({"request": ["prompt"]})
    assert "request" in message_errors({"request": None})
    assert message_errors({}) == {"request": ["Missing data for required field."]}
    assert message_errors({"request": {}, "extra": 1}) == {"extra": ["Unknown field."]}
    # The body is not validated here: that is GenerationRequestSchema's job.
    assert not message_errors({"request": {"seed": 1}})


# -- redaction ------------------------------------------------------------------


def test_redaction_replaces_inline_images_and_keeps_urls():
    request = {
        "prompt": "x",
        "n": 2,
        "image_list": [{"image": data_uri("png", PNG)}, {"image": "https://a/b.png"}, {"image": data_uri("jpg", JPEG)}],
    }
    before = copy.deepcopy(request)
    redacted = redact_request(request)
    assert request == before  # input untouched
    assert redacted == {
        "prompt": "x",
        "n": 2,
        "image_list": [
            {"image": f"data:image/png;sha256={hashlib.sha256(PNG).hexdigest()};bytes={len(PNG)}"},
            {"image": "https://a/b.png"},
            {"image": f"data:image/jpg;sha256={hashlib.sha256(JPEG).hexdigest()};bytes={len(JPEG)}"},
        ],
    }
    redacted["image_list"][1]["image"] = "changed"
    assert request == before  # a deep copy, not a shallow one


def test_redaction_without_images_and_of_malformed_base64():
    assert redact_request({"prompt": "x"}) == {"prompt": "x"}
    blob = "data:image/png;base64,@@" + "A" * 1000
    assert "A" * 100 not in redact_request({"prompt": "x", "image_list": [{"image": blob}]})["image_list"][0]["image"]


def image_error(image: str) -> list[str]:
    return errors({"prompt": "x", "image_list": [{"image": image}]})["image_list"][0]["image"]


@pytest.mark.parametrize(
    "payload, message",
    [
        # 3/4 of the length, rounded down, is exactly the limit: not refused for its size
        ("A" * 13_981_014, "inline image is not valid base64"),
        # the padding that is counted is the last two characters' only
        ("A" * 13_981_015 + "===", "inline image is larger than 10 MB"),
        ("=" * 13_981_020, "inline image is larger than 10 MB"),
    ],
)
def test_inline_image_size_is_reckoned_from_the_base64_length(payload, message):
    assert image_error("data:image/png;base64," + payload) == [message]


@pytest.mark.parametrize(
    "image, message",
    [
        ("data:image/gif;base64,R0lG", "inline images must be data:image/jpeg;base64,... or data:image/png;base64,..."),
        ("data:image/png;base64,@@", "inline image is not valid base64"),
        ("ftp://img.example/a.png", "must be an http(s) URL or a base64 data URI of a JPEG or PNG"),
        ("http://[::1", "must be an http(s) URL or a base64 data URI of a JPEG or PNG"),
    ],
)
def test_image_messages_exactly(image, message):
    assert image_error(image) == [message]


@pytest.mark.parametrize(
    "messages, path, line",
    [
        ({"_schema": ["must be an object"]}, "", "must be an object"),
        ({"_schema": ["too many images"]}, "request", "request: too many images"),
        (
            {"n": ["must be 1 to 9"], "prompt": ["required", "a string"]},
            "",
            "n: must be 1 to 9; prompt: required a string",
        ),
        ({"image_list": {0: {"image": ["bad"]}}}, "request", "request.image_list.0.image: bad"),
        (["first", "second"], "", "first second"),
        (["first"], "job_id", "job_id: first"),
        ([{"n": ["too big"]}, ["plain"]], "request", "request.n: too big; request: plain"),
        ("oops", "", "oops"),
        ("oops", "metadata", "metadata: oops"),
        (5, "", "5"),
    ],
)
def test_errors_line(messages, path, line):
    assert errors_line(messages, path) == line
