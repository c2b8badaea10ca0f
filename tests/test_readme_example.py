"""The README's library example runs as written, on the shipped demo model, with public names only."""

from __future__ import annotations

import ast
import json
import re
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
MARKER = "library example"  # the first python block after a line holding this is the example
MAX_LINES = 12


def readme_example() -> str:
    text = (ROOT / "README.md").read_text(encoding="utf-8")
    at = text.lower().find(MARKER)
    assert at >= 0, f"README.md has no line with {MARKER!r}"
    block = re.search(r"^```python\n(.*?)^```", text[at:], re.DOTALL | re.MULTILINE)
    assert block, f"no ```python block after {MARKER!r} in README.md"
    return block.group(1)


def test_the_example_is_short_and_uses_only_public_names():
    import cldm

    code = readme_example()
    assert len(code.strip().splitlines()) <= MAX_LINES
    for node in ast.walk(ast.parse(code)):
        if isinstance(node, ast.Import):
            assert [a.name for a in node.names] == ["cldm"], ast.unparse(node)
        elif isinstance(node, ast.ImportFrom):
            assert node.module == "cldm" and not node.level, ast.unparse(node)
            assert all(a.name in cldm.__all__ for a in node.names), ast.unparse(node)
        elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and node.value.id == "cldm":
            assert node.attr in cldm.__all__, ast.unparse(node)


def test_the_example_writes_a_picture_that_follows_the_hint_and_the_prompt(tmp_path, monkeypatch):
    """The picture has the model card's size, its parameters, the hint's shapes (a circle below a star) and the
    prompt's colours (a green circle and a red star on white), where the example picture (shapes.png) has a blue
    circle and a yellow star on pink."""
    import cldm

    (tmp_path / "assets").symlink_to(ROOT / "assets")  # the example names the shipped files by relative path
    monkeypatch.chdir(tmp_path)
    exec(compile(readme_example(), "README.md (library example)", "exec"), {"__name__": "readme_example"})
    pictures = sorted(tmp_path.glob("*.png"))
    assert len(pictures) == 1, pictures
    size = json.loads((ROOT / "assets" / "demo" / "model_card.json").read_text())["size"]
    with Image.open(pictures[0]) as img:
        assert img.size == (size, size) and img.mode == "RGB"
    text = cldm.read_parameters(pictures[0])
    assert text and "Model: shapes_sd" in text and "control_v11p_sd15_" in text, text
    rgb = np.asarray(Image.open(pictures[0]).convert("RGB")).astype(int)
    circle, star = rgb[32:44, 26:42], rgb[8:20, 32:44]
    border = np.concatenate([rgb[:4], rgb[-4:], rgb[:, :4].transpose(1, 0, 2), rgb[:, -4:].transpose(1, 0, 2)], 1)
    r, g, b = (circle[..., c].mean() for c in range(3))
    assert g > r + 40 and g > b + 40, ("the circle is not green", r, g, b)
    r, g, b = (star[..., c].mean() for c in range(3))
    assert r > g + 40 and r > b + 40, ("the star is not red", r, g, b)
    assert border.mean(axis=(0, 1)).min() > 225, ("the background is not white", border.mean(axis=(0, 1)))
