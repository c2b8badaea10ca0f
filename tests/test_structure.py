"""The architecture's rules, checked on the source: who may import what, who reads files, how long modules are;
the model card; and requests refused before any sampling step (bad fields, ControlNets of another family)."""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
WINGS = ("training", "scale", "bench")
CORE = sorted(p for p in (ROOT / "cldm").rglob("*.py") if p.relative_to(ROOT / "cldm").parts[0] not in WINGS
              and p.name != "__main__.py")  # fmt: skip
APP = [ROOT / "app.py", *sorted((ROOT / "studio").glob("*.py"))]
SCALE = sorted((ROOT / "cldm" / "scale").glob("*.py"))  # batch and Ray: Ray only in two of them


def _imports(path: Path) -> set[str]:
    """Every module a file imports, at the top or inside a function (relative imports made absolute)."""
    package = ".".join(path.relative_to(ROOT).with_suffix("").parts[:-1])
    out = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            out |= {a.name for a in node.names}
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")[: len(package.split(".")) - node.level + 1]
                base = ".".join(p for p in [*parts, base] if p)
            out |= {base} | {f"{base}.{a.name}" for a in node.names}
    return out


def test_rules_hold_on_these_files():
    """The checker itself: it sees relative, absolute and in-function imports."""
    assert "cldm.training.cli" in _imports(ROOT / "cldm" / "__main__.py")
    assert {"cldm.io.checkpoints", "cldm.io.writers"} <= _imports(ROOT / "cldm" / "training" / "export.py")
    assert "cldm.training.shapes" in _imports(ROOT / "cldm" / "training" / "vocab.py")
    assert "annotators" in _imports(ROOT / "cldm" / "hints" / "fitted.py")


@pytest.mark.parametrize("path", CORE + APP, ids=lambda p: p.name)
def test_core_and_app_never_import_training(path):
    bad = {m for m in _imports(path) if m.startswith("cldm.training")}
    assert not bad, f"{path.name} imports {bad}"


@pytest.mark.parametrize("path", CORE, ids=lambda p: p.name)
def test_core_imports_neither_the_ui_nor_the_annotators(path):
    allowed = ("annotators",) if path.parent.name == "hints" else ()  # the one core package over the annotators
    bad = {m for m in _imports(path) if m.split(".")[0] in ("gradio", "annotators", "app", "studio")}
    bad = {m for m in bad if m.split(".")[0] not in allowed}
    assert not bad, f"{path.name} imports {bad}"


@pytest.mark.parametrize("path", CORE + APP + SCALE, ids=lambda p: p.name)
def test_ray_is_imported_only_by_the_ray_modules(path):
    """Ray is an optional extra: nothing but scale/ray_batch.py and scale/serve.py may import it at the top."""
    tree = ast.parse(path.read_text(encoding="utf-8"))
    top = {a.name for n in tree.body if isinstance(n, ast.Import) for a in n.names}
    top |= {n.module or "" for n in tree.body if isinstance(n, ast.ImportFrom)}
    assert not {m for m in top if m.split(".")[0] == "ray"}
    if path.name not in ("ray_batch.py", "serve.py"):
        assert "ray" not in {m.split(".")[0] for m in _imports(path)}, f"{path.name} imports ray"


def _loaded_after(imports: str, prefix: str, setup: str = "") -> str:
    """In a fresh interpreter: `setup`, then `import <imports>`; the loaded modules whose names start with `prefix`."""
    code = (
        f"import sys; {setup}import {imports}; "
        f"print(sorted(m for m in sys.modules if m.startswith({prefix!r}) and sys.modules[m] is not None))"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, check=True)
    return out.stdout.strip()


def test_the_app_and_the_batch_command_run_without_ray():
    # with ray made unimportable, importing these must succeed (check=True) and load nothing of it
    assert (
        _loaded_after("app, cldm.scale.batch, studio.batch_tab, cldm.__main__", "ray", setup="sys.modules['ray'] = None; ")
        == "[]"
    )


def test_importing_the_app_and_the_cli_loads_no_training_code():
    assert _loaded_after("app, cldm.__main__, cldm.cli", "cldm.training") == "[]"


def test_only_checkpoints_reads_weight_files():
    for path in CORE + APP:
        text = path.read_text(encoding="utf-8")
        calls = {c for c in ("safe_open(", "torch.load(", "load_file(", "load_state_dict(torch") if c in text}
        assert path.name == "checkpoints.py" or not calls, f"{path.name} reads weights itself: {calls}"
    assert "safe_open(" in (ROOT / "cldm" / "io" / "checkpoints.py").read_text(encoding="utf-8")


def test_no_module_is_longer_than_400_lines():
    files = CORE + APP + SCALE + sorted((ROOT / "cldm" / "training").glob("*.py"))
    files += sorted((ROOT / "annotators").glob("*.py"))
    long = {p.name: n for p in files if (n := len(p.read_text(encoding="utf-8").splitlines())) > 400}
    assert not long


# ------------------------------------------------------------------------------------------------ model card
def test_the_shipped_card_is_what_the_export_writes():
    from cldm.io.model_card import card_for
    from cldm.training.export import demo_card

    card = card_for(ROOT / "assets" / "demo" / "shapes_sd.safetensors")
    assert card == demo_card() and card.size == 64 and card.folder == ROOT / "assets" / "demo"
    for example in card.examples.values():
        assert (ROOT / "assets" / "examples" / example["image"]).is_file()


def test_a_damaged_card_is_named(tmp_path):
    from cldm.errors import CheckpointError
    from cldm.io.model_card import card_for

    (tmp_path / "m.safetensors").write_bytes(b"x")
    (tmp_path / "model_card.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="model_card.json.*not a readable model card"):
        card_for(tmp_path / "m.safetensors")
    (tmp_path / "model_card.json").write_text(json.dumps({"name": "x"}))
    with pytest.raises(CheckpointError, match="KeyError"):
        card_for(tmp_path / "m.safetensors")
    assert card_for("some/hub-id") is None


def test_cli_uses_the_card_size(tmp_path, capsys):
    from cldm.__main__ import main

    demo = ROOT / "assets" / "demo"
    hint = tmp_path / "hint.png"
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(hint)
    out = tmp_path / "pic.png"
    code = main(["generate", "--base", str(demo / "shapes_sd.safetensors"), "--controlnet",
                 str(demo / "control_v11p_sd15_canny.safetensors"), "--hint", str(hint), "--prompt", "a red square",
                 "--steps", "1", "--out", str(out)])  # fmt: skip
    assert code == 0 and Image.open(out).size == (64, 64)
    assert "native size is 64 px" in capsys.readouterr().err
    assert main(["generate", "--base", str(demo / "shapes_sd.safetensors"), "--prompt", "a", "--steps", "1",
                 "--width", "128", "--height", "96", "--out", str(out)]) == 0  # fmt: skip
    assert Image.open(out).size == (128, 96)  # told otherwise


# ------------------------------------------------------------------------------------------- checked first
def test_request_fields_are_named_in_one_message():
    from cldm.errors import InputError
    from cldm.pipeline.request import ControlUnit, GenerationRequest

    hint = np.zeros((8, 8, 3), np.uint8)
    bad = GenerationRequest(
        "a", steps=0, width=100, cfg_scale=float("nan"), units=[ControlUnit("x", hint, start=0.9, end=0.1)]
    )
    with pytest.raises(InputError) as e:
        bad.validate()
    msg = str(e.value)
    assert "cfg_scale must be a finite number" in msg and "ControlNet 1 (x): need 0 <= start < end" in msg
    with pytest.raises(InputError, match="steps must be 1..999.*width and height must be multiples of 8"):
        GenerationRequest("a", steps=0, width=100).validate()
    with pytest.raises(InputError, match="seed is missing"):
        GenerationRequest("a", seed=None).validate()
    with pytest.raises(InputError, match="sampler must be one of"):
        GenerationRequest("a", sampler="plms").validate()
    with pytest.raises(InputError, match="hint must be an HxWx3 uint8"):
        GenerationRequest("a", units=[ControlUnit("x", hint[..., 0])]).validate()
    assert GenerationRequest("a", units=[ControlUnit("x", hint)]).validate().units[0].label == "x"


def test_a_controlnet_of_another_family_is_refused_before_sampling(
    tiny_dirs, ours, misfit_controlnet, tmp_path, capsys
):
    from cldm.__main__ import main
    from cldm.errors import InputError
    from cldm.io import writers
    from cldm.pipeline.request import ControlUnit, GenerationRequest
    from cldm.pipeline.stages import generate

    sd, _ = ours
    steps = []
    request = GenerationRequest("a", units=[ControlUnit(misfit_controlnet, np.zeros((64, 64, 3), np.uint8))],
                                steps=2, width=64, height=64)  # fmt: skip
    with pytest.raises(
        InputError, match=r"does not fit this base model.*block widths \[64, 128, 128\].*block widths \[32, 64, 64\]"
    ):
        generate(sd, request, callback=lambda i, n: steps.append(i))
    assert steps == []  # not one step ran
    writers.save_controlnet(misfit_controlnet, tmp_path / "misfit.safetensors")
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(tmp_path / "hint.png")
    code = main(["generate", "--base", str(tiny_dirs[0]), "--controlnet",
                 str(tmp_path / "misfit.safetensors"), "--hint", str(tmp_path / "hint.png"), "--prompt", "a",
                 "--width", "64", "--height", "64", "--out", str(tmp_path / "out.png")])  # fmt: skip
    err = capsys.readouterr().err
    assert code == 2 and "misfit.safetensors does not fit the base model" in err and "text context" in err
    assert "step" not in err.replace("steps", "") and not (tmp_path / "out.png").exists()
