"""Every rule of shared/modellix-api.md, at its boundaries."""
from __future__ import annotations

import base64

import pytest
from marshmallow import ValidationError

from worker.sandbox import png
from worker.schemas import (
    ASPECT_RATIOS,
    MAX_IMAGE_BYTES,
    UNSUPPORTED,
    GenerationRequestSchema,
    MessageSchema,
    redact_request,
)

PNG = png(2, 2)
JPEG = b"\xff\xd8\xff\xe0\x00\x10JFIF\x00" + b"\x00" * 32 + b"\xff\xd9"


def data_uri(kind: str, data: bytes) -> str:
    return f"data:image/{kind};base64,{base64.b64encode(data).decode()}"


def errors(body: dict) -> dict:
    with pytest.raises(ValidationError) as info:
        GenerationRequestSchema().load(body)
    return info.value.messages


def ok(body: dict) -> dict:
    return GenerationRequestSchema().load(body)


def test_minimal_request_loads_without_injected_defaults():
    assert ok({"prompt": "hi"}) == {"prompt": "hi"}


@pytest.mark.parametrize("prompt, valid", [("", False), ("   ", False), ("a", True), ("a" * 2500, True),
                                           ("a" * 2501, False), ("猫" * 2500, True), ("猫" * 2501, False)])
def test_prompt_length_in_characters(prompt, valid):
    if valid:
        assert ok({"prompt": prompt})["prompt"] == prompt
    else:
        assert "prompt" in errors({"prompt": prompt})


def test_prompt_is_required_and_a_string():
    assert "prompt" in errors({})
    assert "prompt" in errors({"prompt": 5})


@pytest.mark.parametrize("n, valid", [(0, False), (1, True), (9, True), (10, False), (True, False),
                                      (2.0, False), ("3", False), (None, False)])
def test_n(n, valid):
    if valid:
        assert ok({"prompt": "x", "n": n})["n"] == n
    else:
        assert "n" in errors({"prompt": "x", "n": n})


@pytest.mark.parametrize("ratio", ASPECT_RATIOS)
def test_every_aspect_ratio(ratio):
    assert ok({"prompt": "x", "aspect_ratio": ratio})["aspect_ratio"] == ratio


@pytest.mark.parametrize("field, value", [("aspect_ratio", "5:4"), ("aspect_ratio", "AUTO"),
                                          ("resolution", "4k"), ("resolution", "1K")])
def test_enumerations_reject_others(field, value):
    assert field in errors({"prompt": "x", field: value})


@pytest.mark.parametrize("value", ["1k", "2k"])
def test_resolutions(value):
    assert ok({"prompt": "x", "resolution": value})["resolution"] == value


def images(k: int) -> list[dict]:
    return [{"image": f"https://img.example/{i}.png"} for i in range(k)]


def elements(k: int) -> list[dict]:
    return [{"element_id": i} for i in range(k)]


def test_list_limits_and_their_total():
    assert len(ok({"prompt": "x", "image_list": images(10)})["image_list"]) == 10
    assert "image_list" in errors({"prompt": "x", "image_list": images(11)})
    assert "element_list" in errors({"prompt": "x", "element_list": elements(11)})
    assert ok({"prompt": "x", "image_list": images(5), "element_list": elements(5)})
    message = errors({"prompt": "x", "image_list": images(6), "element_list": elements(5)})["_schema"][0]
    assert "11" in message and "10" in message


@pytest.mark.parametrize("value, valid", [(2**63 - 1, True), (-(2**63), True), (2**63, False),
                                          (-(2**63) - 1, False), ("12", False), (1.5, False), (True, False)])
def test_element_id_is_a_64_bit_integer(value, valid):
    body = {"prompt": "x", "element_list": [{"element_id": value}]}
    if valid:
        assert ok(body)["element_list"] == [{"element_id": value}]
    else:
        assert "element_list" in errors(body)


def test_list_items_take_no_other_keys():
    assert "image_list" in errors({"prompt": "x", "image_list": [{"image": "https://a/b.png", "weight": 1}]})
    assert "element_list" in errors({"prompt": "x", "element_list": [{"element_id": 1, "name": "a"}]})
    assert "image_list" in errors({"prompt": "x", "image_list": ["https://a/b.png"]})


@pytest.mark.parametrize("field", UNSUPPORTED)
def test_unsupported_fields_are_named(field):
    found = errors({"prompt": "x", field: "anything"})
    assert found[field] == ["not supported by kling-image-o1"]


def test_unsupported_and_other_errors_are_reported_together():
    found = errors({"prompt": "", "negative_prompt": "blur", "n": 11})
    assert set(found) == {"prompt", "negative_prompt", "n"}


def test_unknown_field():
    assert errors({"prompt": "x", "seed": 1}) == {"seed": ["Unknown field."]}


@pytest.mark.parametrize("url, valid", [
    ("http://img.example/a.png", True), ("https://img.example/a", True),
    ("ftp://img.example/a.png", False), ("file:///etc/passwd", False), ("javascript:alert(1)", False),
    ("not a url", False), ("https:///no-host.png", False), ("data:text/plain;base64,aGk=", False),
])
def test_image_urls(url, valid):
    body = {"prompt": "x", "image_list": [{"image": url}]}
    if valid:
        assert ok(body)
    else:
        assert "image_list" in errors(body)


def test_inline_images_must_be_real_png_or_jpeg():
    assert ok({"prompt": "x", "image_list": [{"image": data_uri("png", PNG)}, {"image": data_uri("jpeg", JPEG)},
                                             {"image": data_uri("jpg", JPEG)}]})
    for bad, why in [("data:image/png;base64,@@not base64@@", "base64"),
                     (data_uri("png", b"GIF89a" + b"\x00" * 20), "neither"),
                     (data_uri("png", b"hello world"), "neither"),
                     (data_uri("png", JPEG), "jpeg"),
                     (data_uri("gif", b"GIF89a"), "data:image/jpeg")]:
        message = str(errors({"prompt": "x", "image_list": [{"image": bad}]})["image_list"])
        assert why in message, (bad[:40], message)


def test_inline_image_size_limit():
    at_limit = PNG + b"\x00" * (MAX_IMAGE_BYTES - len(PNG))
    assert ok({"prompt": "x", "image_list": [{"image": data_uri("png", at_limit)}]})
    over = errors({"prompt": "x", "image_list": [{"image": data_uri("png", at_limit + b"\x00")}]})
    assert "10 MB" in str(over)


@pytest.mark.parametrize("prompt, count, valid", [
    ("<<<image_1>>>", 1, True), ("<<<image_2>>>", 1, False), ("<<<image_2>>> and <<<image_1>>>", 2, True),
    ("<<<image_0>>>", 1, False), ("<<<image_1>>>", 0, False), ("no reference", 0, True),
])
def test_prompt_references_stay_within_the_images(prompt, count, valid):
    body = {"prompt": prompt}
    if count:
        body["image_list"] = images(count)
    if valid:
        assert ok(body)
    else:
        assert "<<<image_" in errors(body)["prompt"][0]


@pytest.mark.parametrize("job_id, valid", [("a", True), ("A-z_0.9:x", True), ("x" * 64, True), ("x" * 65, False),
                                           ("", False), ("has space", False), ("a/b", False), ("ü", False),
                                           (7, False), (None, True)])
def test_message_job_id(job_id, valid):
    result = MessageSchema().validate({"request": {}, "job_id": job_id})
    assert (not result) is valid, result


def test_message_metadata_size_and_shape():
    base = len('{"k":""}')
    assert not MessageSchema().validate({"request": {}, "metadata": {"k": "a" * (4096 - base)}})
    assert "metadata" in MessageSchema().validate({"request": {}, "metadata": {"k": "a" * (4097 - base)}})
    assert "metadata" in MessageSchema().validate({"request": {}, "metadata": ["not", "an", "object"]})
    assert "request" in MessageSchema().validate({"request": "text"})
    assert "request" in MessageSchema().validate({})
    assert "extra" in MessageSchema().validate({"request": {}, "extra": 1})


def test_redaction_keeps_urls_and_replaces_inline_images():
    inline = data_uri("png", PNG)
    request = {"prompt": "x", "image_list": [{"image": inline}, {"image": "https://a/b.png"}]}
    redacted = redact_request(request)
    assert request["image_list"][0]["image"] == inline  # input untouched
    assert redacted["image_list"][0]["image"].startswith("data:image/png;sha256=")
    assert redacted["image_list"][0]["image"].endswith(f";bytes={len(PNG)}")
    assert redacted["image_list"][1] == {"image": "https://a/b.png"}
