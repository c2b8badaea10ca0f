"""Draws the example inputs in assets/examples/ (run once; the PNGs are committed). Free to ship: we made them."""

from __future__ import annotations

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter

OUT = Path(__file__).parent / "examples"
SIZE = 512

# OpenPose (COCO 18-keypoint) limbs and the colours the ControlNet openpose model was trained with.
POSE = {
    "nose": (256, 110), "neck": (256, 170), "r_sho": (206, 172), "r_elb": (180, 240), "r_wri": (170, 305),
    "l_sho": (306, 172), "l_elb": (340, 235), "l_wri": (375, 290), "r_hip": (226, 300), "r_knee": (220, 385),
    "r_ank": (215, 465), "l_hip": (286, 300), "l_knee": (295, 385), "l_ank": (305, 465), "r_eye": (246, 100),
    "l_eye": (266, 100), "r_ear": (232, 108), "l_ear": (280, 108),
}  # fmt: skip
LIMBS = [
    ("neck", "r_sho"), ("neck", "l_sho"), ("r_sho", "r_elb"), ("r_elb", "r_wri"), ("l_sho", "l_elb"),
    ("l_elb", "l_wri"), ("neck", "r_hip"), ("r_hip", "r_knee"), ("r_knee", "r_ank"), ("neck", "l_hip"),
    ("l_hip", "l_knee"), ("l_knee", "l_ank"), ("neck", "nose"), ("nose", "r_eye"), ("r_eye", "r_ear"),
    ("nose", "l_eye"), ("l_eye", "l_ear"),
]  # fmt: skip
COLOURS = [
    (255, 0, 0), (255, 85, 0), (255, 170, 0), (255, 255, 0), (170, 255, 0), (85, 255, 0), (0, 255, 0),
    (0, 255, 85), (0, 255, 170), (0, 255, 255), (0, 170, 255), (0, 85, 255), (0, 0, 255), (85, 0, 255),
    (170, 0, 255), (255, 0, 255), (255, 0, 170), (255, 0, 85),
]  # fmt: skip


def house() -> Image.Image:
    """A small coloured scene with clear edges, depth cues and regions."""
    img = Image.new("RGB", (SIZE, SIZE))
    d = ImageDraw.Draw(img)
    for y in range(SIZE // 2 + 40):  # sky gradient
        d.line([(0, y), (SIZE, y)], fill=(120 + y // 4, 170 + y // 8, 235))
    d.rectangle([0, SIZE // 2 + 40, SIZE, SIZE], fill=(90, 150, 70))
    d.ellipse([400, 40, 470, 110], fill=(250, 220, 90))
    d.rectangle([140, 220, 370, 400], fill=(200, 120, 80), outline=(90, 50, 30), width=4)
    d.polygon([(120, 225), (255, 120), (390, 225)], fill=(150, 40, 40), outline=(80, 20, 20))
    d.rectangle([230, 310, 280, 400], fill=(110, 70, 40))
    for x in (165, 305):
        d.rectangle([x, 250, x + 45, 290], fill=(170, 210, 240), outline=(255, 255, 255), width=3)
    d.ellipse([30, 250, 120, 340], fill=(40, 110, 50))
    d.rectangle([70, 330, 82, 410], fill=(90, 60, 30))
    return img.filter(ImageFilter.GaussianBlur(0.8))


def sketch() -> Image.Image:
    """The same house as a black-on-white line sketch, like a browser-canvas drawing."""
    img = Image.new("RGB", (SIZE, SIZE), "white")
    d = ImageDraw.Draw(img)
    d.line([(140, 400), (140, 225), (255, 120), (370, 225), (370, 400), (140, 400)], fill="black", width=6)
    d.line([(140, 225), (370, 225)], fill="black", width=6)
    d.rectangle([230, 310, 280, 400], outline="black", width=6)
    d.ellipse([400, 40, 470, 110], outline="black", width=6)
    d.line([(0, 440), (SIZE, 440)], fill="black", width=6)
    return img


def pose() -> Image.Image:
    """A standing person as an OpenPose skeleton (already a hint: use the "none" preprocessor)."""
    img = Image.new("RGB", (SIZE, SIZE), "black")
    d = ImageDraw.Draw(img)
    for (a, b), colour in zip(LIMBS, COLOURS):
        d.line([POSE[a], POSE[b]], fill=tuple(int(c * 0.6) for c in colour), width=8)
    for (_, point), colour in zip(POSE.items(), COLOURS):
        d.ellipse([point[0] - 5, point[1] - 5, point[0] + 5, point[1] + 5], fill=colour)
    return img


# The demo model's examples (app.py --demo), drawn by the generator the model was trained on, at 256 px (the app
# brings them down to 64): "a blue circle and a yellow star on a pink background" with its segmentation map; the same
# picture with the circle painted over (inpaint); a blurry "a purple ring and an orange square on a white background"
# (tile: the ring overlaps the square); a triangle sketched as in the browser.
SHAPES_SIZE = 256
SHAPES_SCENE = (
    ("circle", "blue", (134.51343382929838, 163.32770389137949), 60.66127300981242, 0.0),
    ("star", "yellow", (152.93819889621864, 58.4744991670267), 53.90739681625999, -10.386107463422611),
), ("pink",)  # fmt: skip
TILE_SCENE = (("square", "orange", (25.0, 38.0), 15.5, 8.0), ("ring", "purple", (41.0, 25.0), 14.5, 0.0)), ("white",)
TILE_FACTOR = 4  # the tile example: its scene drawn at 64 px (coordinates above), shrunk to 16 px, blown up
MASK_GROW = 12  # px at 256: the inpaint example's mask covers the circle and a little around it


def _scene(scene, size: int = SHAPES_SIZE):
    import sys

    sys.path.insert(0, str(Path(__file__).parents[1]))
    from cldm.training.shapes import Shape, make_scene

    shapes, background = scene
    return make_scene([Shape(*s) for s in shapes], background, size)


def shapes() -> tuple[Image.Image, Image.Image]:
    s = _scene(SHAPES_SCENE)
    return Image.fromarray(s.image), Image.fromarray(s.seg)


def circle_mask() -> Image.Image:
    """The inpaint example's painted layer: the circle of shapes.png and a margin, white and opaque on transparent."""
    s = _scene(SHAPES_SCENE)
    circle = (s.labels == 1).astype(np.uint8)  # class 1 is the circle
    grown = Image.fromarray(circle * 255).filter(ImageFilter.MaxFilter(2 * MASK_GROW + 1))
    layer = Image.new("RGBA", grown.size, (255, 255, 255, 0))
    layer.putalpha(grown)
    return layer


def blurry_shapes() -> Image.Image:
    small = _scene(TILE_SCENE, 64).image
    tiny = Image.fromarray(small).resize((64 // TILE_FACTOR,) * 2, Image.Resampling.BOX)
    return tiny.resize((SHAPES_SIZE, SHAPES_SIZE), Image.Resampling.BICUBIC)


def triangle_sketch() -> Image.Image:
    """An outline triangle drawn with the demo canvas's brush (16 px on 512: 2 px at the demo's 64 px)."""
    img = Image.new("RGB", (SIZE, SIZE), "white")
    d = ImageDraw.Draw(img)
    d.line([(256, 110), (410, 390), (102, 390), (256, 110)], fill="black", width=16, joint="curve")
    return img


def main() -> None:
    OUT.mkdir(parents=True, exist_ok=True)
    house().save(OUT / "house.png", optimize=True)
    sketch().save(OUT / "house_sketch.png", optimize=True)
    pose().save(OUT / "pose.png", optimize=True)
    picture, seg = shapes()
    picture.save(OUT / "shapes.png", optimize=True)
    seg.save(OUT / "shapes_seg.png", optimize=True)
    circle_mask().save(OUT / "shapes_circle_mask.png", optimize=True)
    blurry_shapes().save(OUT / "shapes_blurry.png", optimize=True)
    triangle_sketch().save(OUT / "triangle_sketch.png", optimize=True)
    np.asarray(house())  # the examples must stay plain RGB
    print("wrote", sorted(p.name for p in OUT.iterdir()))


if __name__ == "__main__":
    main()
