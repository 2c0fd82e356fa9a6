"""The ocr-inpaint editor on real photos: it finds the text itself and replaces it locally."""

import numpy as np
import pytest

from safetypairs.backends.ocr import read_text
from safetypairs.backends.ocr_edit import (
    EditError,
    OCRInpaintOptions,
    replace_text,
)
from safetypairs.backends.registry import build_backend
from safetypairs.backends.render import TextStyle, draw_text
from safetypairs.sources import demo_photo


def _captioned(text="YOU ARE A LOSER", box=(40, 400, 470, 460)):
    image = demo_photo("astronaut").copy()
    draw_text(image, text, box, TextStyle())
    return image, box


def test_replaces_text_only_inside_the_caption_box():
    image, (x0, y0, x1, y1) = _captioned()
    edited = build_backend("editors", "ocr-inpaint").edit(
        [image], ["Replace the text 'YOU ARE A LOSER' with 'HAVE A NICE DAY'; keep everything else unchanged."], [0]
    )[0]
    assert edited.size == image.size
    texts = [line.text.upper() for line in read_text(edited)]
    assert any("NICE DAY" in t for t in texts) and not any("LOSER" in t for t in texts)
    diff = np.abs(np.asarray(image, np.int16) - np.asarray(edited, np.int16)).sum(axis=2) > 0
    ys, xs = np.nonzero(diff)
    margin = 25
    assert xs.min() >= x0 - margin and xs.max() <= x1 + margin and ys.min() >= y0 - margin and ys.max() <= y1 + margin
    assert 0.02 < diff.mean() < (x1 - x0 + 2 * margin) * (y1 - y0 + 2 * margin) / diff.size


def test_noop_instruction_rerenders_the_same_text():
    image, _ = _captioned()
    control = replace_text(image, "YOU ARE A LOSER", "YOU ARE A LOSER")
    assert any("LOSER" in line.text.upper() for line in read_text(control))
    assert not np.array_equal(np.asarray(control), np.asarray(image))  # it carries editor artifacts


def test_errors_are_clear():
    image, _ = _captioned()
    editor = build_backend("editors", "ocr-inpaint:match=0.9")
    with pytest.raises(EditError, match="not found in the image"):
        editor.edit([image], ["Replace the text 'HELLO WORLD' with 'X'"], [0])
    with pytest.raises(EditError, match="only carries out"):
        editor.edit([image], ["Remove the insult"], [0])
    with pytest.raises(ValueError, match="allowed: match, radius, grow"):
        build_backend("editors", "ocr-inpaint:strength=2")
    with pytest.raises(ValueError, match="ocr-inpaint option radius must be an integer, got 2.5"):
        build_backend("editors", "ocr-inpaint", radius=2.5)
    with pytest.raises(ValueError, match=r"match=1.5 \(allowed: \[0, 1\]\); radius=0 \(allowed: >= 1\)"):
        build_backend("editors", "ocr-inpaint:match=1.5,radius=0")
    assert build_backend("editors", "ocr-inpaint:radius=3", grow="0.2").options == OCRInpaintOptions(0.6, 3, 0.2)
