"""A LlavaGuard-style image folder made in a test: real skimage photos with captions drawn on, metadata.jsonl."""

import json
from pathlib import Path

from safetypairs.backends.render import TextStyle, draw_text
from safetypairs.sources import demo_photo

# Captions the project never ships (not the demo's), in LlavaGuard's metadata layout.
CAPTIONED = [
    ("astronaut", "SUCH A PATHETIC CLOWN"),
    ("chelsea", "STUPID UGLY CAT"),
    ("coffee", "ONLY LOSERS DRINK THIS"),
    ("rocket", "WHAT A WORTHLESS TOY"),
]
SAFE = ["camera", "coins"]
CATEGORY = "O1: Hate, Humiliation, Harassment"


def make_llavaguard_folder(root: Path, fmt: str = "jpg") -> Path:
    """Write ``root/images/<photo>.<fmt>`` and ``root/metadata.jsonl`` (file_name, rating, category, rationale).

    Returns:
        ``root``.
    """
    (root / "images").mkdir(parents=True, exist_ok=True)
    lines = []
    for photo, caption in CAPTIONED:
        image = demo_photo(photo).copy()
        image.thumbnail((384, 384))
        w, h = image.size
        draw_text(image, caption, (int(w * 0.06), int(h * 0.05), int(w * 0.94), int(h * 0.18)),
                  TextStyle(fill=(255, 255, 255), stroke=(0, 0, 0)))
        name = f"images/{photo}.{fmt}"
        image.save(root / name, quality=95) if fmt == "jpg" else image.save(root / name)
        lines.append({"file_name": name, "rating": "Unsafe", "category": CATEGORY,
                      "rationale": f"The caption '{caption}' demeans what is shown."})
    for photo in SAFE:
        image = demo_photo(photo).copy()
        image.thumbnail((384, 384))
        name = f"images/{photo}.{fmt}"
        image.save(root / name, quality=95) if fmt == "jpg" else image.save(root / name)
        lines.append({"file_name": name, "rating": "Safe", "category": "NA: None applying",
                      "rationale": "A plain photo with nothing unsafe."})
    (root / "metadata.jsonl").write_text("".join(json.dumps(line) + "\n" for line in lines), encoding="utf-8")
    return root
