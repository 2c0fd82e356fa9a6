"""Drawing a line of text into a box (demo captions and the OCR editor's replacements)."""

from __future__ import annotations

import functools
from dataclasses import dataclass
from pathlib import Path

from PIL import Image, ImageDraw, ImageFont

# DejaVu fonts ship inside matplotlib's wheel (a dependency), so they exist on every machine.
FONTS = (
    "DejaVuSans-Bold.ttf",
    "DejaVuSerif-Bold.ttf",
    "DejaVuSansMono-Bold.ttf",
    "DejaVuSans.ttf",
    "DejaVuSerif-Italic.ttf",
)
DEFAULT_FONT = FONTS[0]


def font_path(name: str) -> Path:
    """Absolute path of a font shipped with matplotlib.

    Raises:
        ValueError: for a font name not in `FONTS`.
    """
    if name not in FONTS:
        raise ValueError(f"unknown font {name!r}; allowed: {', '.join(FONTS)}")
    import matplotlib

    return Path(matplotlib.get_data_path()) / "fonts" / "ttf" / name


@functools.lru_cache(maxsize=256)
def _font(name: str, size: int) -> ImageFont.FreeTypeFont:
    return ImageFont.truetype(str(font_path(name)), size)


@dataclass(frozen=True)
class TextStyle:
    """How a line of text looks: font, colours (RGB) and outline width as a share of the size."""

    font: str = DEFAULT_FONT
    fill: tuple[int, int, int] = (255, 255, 255)
    stroke: tuple[int, int, int] | None = (0, 0, 0)
    stroke_ratio: float = 0.06


def fit_font(text: str, style: TextStyle, max_width: int, max_height: int) -> ImageFont.FreeTypeFont:
    """The largest font size at which ``text`` fits in ``max_width`` x ``max_height`` pixels."""
    lo, hi = 6, max(7, max_height * 2)
    while lo < hi:
        mid = (lo + hi + 1) // 2
        x0, y0, x1, y1 = _font(style.font, mid).getbbox(text)
        if x1 - x0 <= max_width and y1 - y0 <= max_height:
            lo = mid
        else:
            hi = mid - 1
    return _font(style.font, lo)


def draw_text(image: Image.Image, text: str, box: tuple[int, int, int, int], style: TextStyle) -> tuple[int, int, int, int]:
    """Draw ``text`` centred in ``box`` (x0, y0, x1, y1), as large as fits, on ``image`` in place.

    Args:
        image: an RGB image, modified in place.
        text: one line of text.
        box: the area to fill.
        style: font and colours.

    Returns:
        The bounding box of the drawn ink, outline included.
    """
    x0, y0, x1, y1 = box
    font = fit_font(text, style, max(1, x1 - x0), max(1, y1 - y0))
    stroke_width = max(1, round(font.size * style.stroke_ratio)) if style.stroke else 0
    draw = ImageDraw.Draw(image)
    bx0, by0, bx1, by1 = draw.textbbox((0, 0), text, font=font, stroke_width=stroke_width)
    left = x0 + ((x1 - x0) - (bx1 - bx0)) // 2 - bx0
    top = y0 + ((y1 - y0) - (by1 - by0)) // 2 - by0
    draw.text((left, top), text, font=font, fill=style.fill, stroke_width=stroke_width, stroke_fill=style.stroke)
    return draw.textbbox((left, top), text, font=font, stroke_width=stroke_width)
