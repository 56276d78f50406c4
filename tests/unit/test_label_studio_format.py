"""Label Studio's formats read and written (`feedback.review.label_studio`), and which images a task
may name (`service.fetching`): pure functions, no Label Studio, no network."""

from __future__ import annotations

import base64

import pytest

from feedback.errors import Invalid, TooLarge
from feedback.review import label_studio as ls
from service.fetching import Fetcher, origin

pytestmark = pytest.mark.unit

CLASSES = ("cat", "dog")


def test_a_configuration_is_read_for_its_choices_and_what_they_label() -> None:
    config = ls.parse_config(
        '<View><Header value="Which?"/><Image name="photo" value="$url" zoom="true"/>'
        '<Choices name="animal" toName="photo"><Choice value="cat"/><Choice value="dog"/></Choices></View>'
    )
    assert config == ls.LabelConfig(from_name="animal", to_name="photo", data_key="url", choices=CLASSES)
    ls.check_config(config, "pets", CLASSES)
    assert ls.parse_config(ls.LabelConfig.default(["a&b", 'say "x"']).xml()).choices == ("a&b", 'say "x"')


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("<View>", "not XML"),
        ('<View><Image name="i" value="$image"/></View>', "has 0"),
        ('<View><Image name="i" value="$i"/><Choices name="a" toName="i"/><Choices name="b" toName="i"/></View>',
         "has 2"),
        ('<View><Image name="i" value="$i"/><Choices name="a" toName="elsewhere"/></View>', "toName"),
        ('<View><Image name="i" value="plain"/><Choices name="a" toName="i"/></View>', "toName"),
    ],
)  # fmt: skip
def test_a_configuration_that_is_not_one_classification_says_why(text: str, fragment: str) -> None:
    with pytest.raises(Invalid, match=fragment):
        ls.parse_config(text)


def test_choices_that_are_not_the_models_classes_are_named() -> None:
    config = ls.LabelConfig("a", "i", "image", ("cat", "bird"))
    with pytest.raises(Invalid, match=r"missing dog; not classes of pets: bird"):
        ls.check_config(config, "pets", CLASSES)


def test_a_prediction_and_the_choice_an_annotation_made() -> None:
    config = ls.LabelConfig.default(CLASSES)
    made = ls.prediction(config, label="dog", confidence=0.8765432, model_version="pets:v1")
    assert made["score"] == 0.876543 and made["model_version"] == "pets:v1"
    assert ls.chosen(made["result"], "label") == "dog"
    assert ls.chosen(made["result"], "other") is None
    assert ls.chosen([{"type": "rectanglelabels", "value": {}}, *made["result"]], None) == "dog"
    assert ls.chosen([], None) is None


def test_an_annotation_is_read_from_a_webhook_or_an_export() -> None:
    task = {"id": 3, "data": {"image": "x"}}
    webhook = {"id": 9, "completed_by": 4, "result": ls.prediction(ls.LabelConfig.default(CLASSES), label="cat",
               confidence=1, model_version="v")["result"], "was_cancelled": False}  # fmt: skip
    read = ls.LabelStudioAnnotation.read(webhook, task, None)
    assert (read.id, read.user, read.task, read.says) == (9, 4, 3, "cat")
    exported = {**webhook, "completed_by": {"id": 4, "email": "a@b"}, "was_cancelled": True}
    assert ls.LabelStudioAnnotation.read(exported, task, None).says == ls.SKIPPED
    with pytest.raises(Invalid, match="completed_by"):
        ls.LabelStudioAnnotation.read({"id": 1}, task, None)


def test_origins_compare_as_browsers_do() -> None:
    assert origin("HTTP://Example.org:80/a?b") == "http://example.org"
    assert origin("https://example.org:8443/") == "https://example.org:8443"
    assert origin("http://127.0.0.1:8080/x") != origin("http://localhost:8080/x")


async def test_only_data_uris_label_studio_and_the_named_hosts_are_read() -> None:
    fetcher = Fetcher(label_studio_url=None, label_studio_token=None, other_origins=("http://ok:1",), max_bytes=100)
    assert await fetcher.read("data:image/png;base64," + base64.b64encode(b"png").decode()) == b"png"
    refusals = [
        ("/data/upload/1/a.png", Invalid, "LOOP_LABEL_STUDIO_URL"),
        ("http://evil:1/a.png", Invalid, "allowed: http://ok:1"),
        ("file:///etc/passwd", Invalid, "neither a data URI"),
        ("data:image/png,raw", Invalid, "base64"),
        ("data:image/png;base64," + "A" * 200, TooLarge, "over 100 bytes"),
    ]
    for reference, error, fragment in refusals:
        with pytest.raises(error, match=fragment):
            await fetcher.read(reference)
    studio = Fetcher("http://studio:8080", "t", (), 100)
    assert studio.allowed == ("http://studio:8080",)
