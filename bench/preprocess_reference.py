"""Expected ImageNet preprocessing for the features stage's tests, computed once and committed.

Writes a few test pictures (smooth gradients, fine stripes that alias if resized carelessly,
hard-edged shapes) to features/tests/data/imagenet/<name>.png, and beside each the 224x224 RGB
result of torchvision's `Resize(256)` then `CenterCrop(224)` on that picture as a PIL image,
<name>.expected.png. On a PIL image those transforms are Pillow's: `Resize` calls
`Image.resize((w, h), Image.BILINEAR)` (Pillow's bilinear widens its kernel when shrinking, i.e.
antialiases) with the shorter side 256 and the longer `int(256 * long / short)`, and `CenterCrop`
crops at `int(round((size - 224) / 2.0))`. That is what is done here, with Pillow alone (the
sandbox cannot install PyTorch; the GPU machine, which has torchvision, can rerun this with
`--torchvision` to check that both agree).

    python3 -m venv .pil && .pil/bin/pip install pillow numpy
    .pil/bin/python bench/preprocess_reference.py
"""

import math
import sys
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

OUT = Path(__file__).resolve().parent.parent / "features" / "tests" / "data" / "imagenet"
SIDE, CROP = 256, 224


def picture(width, height, seed):
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width].astype(np.float64)
    r = 127 + 120 * np.sin(x / (3 + seed) + y / 40)
    g = 255 * x / max(width - 1, 1)
    b = 127 + 120 * np.cos(np.hypot(x - width / 2, y - height / 2) / (2 + seed))
    rgb = np.stack([r, g, b], axis=-1) + rng.normal(0, 2, (height, width, 3))
    img = Image.fromarray(np.clip(rgb, 0, 255).astype(np.uint8), "RGB")
    draw = ImageDraw.Draw(img)
    for i in range(4):
        x0, y0 = int(rng.integers(0, width - 8)), int(rng.integers(0, height - 8))
        draw.rectangle([x0, y0, x0 + width // 5, y0 + height // 6], fill=tuple(int(v) for v in rng.integers(0, 256, 3)))
    return img


def torchvision_pil(img):
    if "--torchvision" in sys.argv:
        from torchvision import transforms

        return transforms.Compose([transforms.Resize(SIDE), transforms.CenterCrop(CROP)])(img)
    w, h = img.size
    short, long = min(w, h), max(w, h)
    new_short, new_long = SIDE, int(SIDE * long / short)
    size = (new_short, new_long) if w <= h else (new_long, new_short)
    resized = img.resize(size, Image.BILINEAR)
    left = int(round((size[0] - CROP) / 2.0))
    top = int(round((size[1] - CROP) / 2.0))
    return resized.crop((left, top, left + CROP, top + CROP))


def main():
    OUT.mkdir(parents=True, exist_ok=True)
    for name, (w, h, seed) in {
        "landscape-512x384": (512, 384, 1),
        "portrait-300x500": (300, 500, 2),
        "small-97x131": (97, 131, 3),
    }.items():
        img = picture(w, h, seed)
        img.save(OUT / f"{name}.png")
        expected = torchvision_pil(img)
        assert expected.size == (CROP, CROP)
        expected.save(OUT / f"{name}.expected.png")
        print(name, img.size, "->", expected.size)


if __name__ == "__main__":
    main()
