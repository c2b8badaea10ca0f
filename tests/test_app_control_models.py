"""Each unit's Model list and effective region in the app: the list names the models folder's control model files
(by name only), the default is the condition's own ControlNet with the request of before, a picked T2I-Adapter gives
the library's picture, a region reaches its unit, a Union takes its control type from the tab's condition, and the
endpoints still take the positional calls of before (integration: the running app through gradio_client)."""

from __future__ import annotations

import shutil
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image

from cldm.hints.conditions import BY_KEY
from cldm.pipeline.request import ControlUnit, GenerationRequest
from cldm.pipeline.union import ControlType
from studio.control_models import OWN_MODEL, control_type
from studio.settings import Settings, UnitSettings
from tests.test_t2i_adapter import sd15  # noqa: F401 (the fixture: a tiny SD1.5 and TencentARC adapter files)

SIZE = 64
T2I_FILE = "t2iadapter_canny_sd15v2.pth"


def _folder(root) -> str:
    """A models folder as a user has one: control models (a T2I-Adapter .pth, a Union diffusers folder, one in
    A1111's ControlNet/), beside files and folders that are not control models."""
    models = root / "models"
    for name in ("ControlNet", "controlnet-union-sdxl-1.0", "image_encoder", "checkpoints"):
        (models / name).mkdir(parents=True)
    for name in (T2I_FILE, "ControlNet/control_sd15_depth.pth", "controlnet-union-sdxl-1.0/config.json",
                 "controlnet-union-sdxl-1.0/diffusion_pytorch_model.safetensors", "ip-adapter_sd15.safetensors",
                 "image_encoder/config.json", "image_encoder/model.safetensors", "notes.txt",
                 "checkpoints/base.safetensors"):  # fmt: skip
        (models / name).write_bytes(b"")  # the list reads names, never contents
    return str(models)


@pytest.fixture(scope="module")
def page(tmp_path_factory):
    """The built page (no model is needed to lay it out) on a models folder with control models, and its Studio."""
    from studio import page
    from studio.service import Studio

    root = tmp_path_factory.mktemp("page")
    manager = type("M", (), {"device": torch.device("cpu"), "base_path": "sd"})()
    studio = Studio(manager, _folder(root), str(root / "out"))
    return page.build_app(studio), studio


def test_the_model_list_names_the_control_model_files(page):
    blocks, studio = page
    listed = ["control_sd15_depth.pth", "controlnet-union-sdxl-1.0", T2I_FILE]
    assert studio.control_models() == listed
    lists = [c["props"] for c in blocks.config["components"] if c["props"].get("label") == "Model"]
    assert len(lists) == len(BY_KEY) + 3  # one per condition tab, one per Multi unit
    for props in lists:
        assert props["value"] == OWN_MODEL  # the default: the condition's own ControlNet
        assert [v for _, v in props["choices"]] == [OWN_MODEL, *listed]


def test_new_parameters_come_last_and_may_be_left_out(page):
    """Positional callers of before stop at `base`: what follows has a default, so their calls still work."""
    info = page[0].get_api_info()["named_endpoints"]
    params = info["/canny_generate"]["parameters"]
    names = [p["parameter_name"] for p in params]
    extras = ["eta", "cfg_rescale", "freeu", "pag_scale", "pag_layers"]  # the guidance extras (issue 29), last
    assert names[-8:] == ["base", "control_model", "region", *extras]
    assert [(p["parameter_has_default"], p["parameter_default"]) for p in params[-7:-5]] == [(True, OWN_MODEL),
                                                                                            (True, None)]  # fmt: skip
    assert [(p["parameter_has_default"], p["parameter_default"]) for p in params[-5:]] == [
        (True, 0.0),
        (True, 0.0),
        (True, False),
        (True, 0.0),
        (True, "mid"),
    ]  # each off unless given
    multi = [p["parameter_name"] for p in info["/multi_generate"]["parameters"]]
    assert multi[-12:] == ["base", *(f"{k}_{i}" for i in (1, 2, 3) for k in ("control_model", "region")), *extras]
    image_prompt = [p["parameter_name"] for p in info["/image_prompt_generate"]["parameters"]]
    assert image_prompt[-6:] == ["base", *extras]


def test_a_union_takes_its_type_from_the_preprocessor_else_the_condition():
    def unit(key, preprocessor, model="union.safetensors"):
        return UnitSettings(BY_KEY[key], None, preprocessor, SIZE, model=model)

    assert control_type(unit("depth", "none"), "none") is ControlType.DEPTH
    assert control_type(unit("canny", "invert"), "invert") is ControlType.CANNY
    assert control_type(unit("inpaint", "inpaint_only"), "") is ControlType.REPAINT  # inpaint units name none
    assert control_type(unit("depth", "depth_midas"), "depth_midas") is None  # the library reads the preprocessor
    assert control_type(unit("depth", "none", model=None), "none") is None  # the condition's own ControlNet


def _hint() -> np.ndarray:
    img = np.zeros((SIZE, SIZE, 3), np.uint8)
    img[16:48, 12:40] = 255
    return img


def _left_half() -> np.ndarray:
    mask = np.zeros((SIZE, SIZE, 3), np.uint8)
    mask[:, : SIZE // 2] = 255
    return mask


@pytest.mark.usefixtures("one_thread")
def test_a_picked_t2i_adapter_and_its_region_give_the_library_picture(sd15, tmp_path):  # noqa: F811
    from cldm.runtime.manager import ModelManager
    from studio.service import Studio

    models = tmp_path / "models"
    models.mkdir()
    shutil.copy(sd15["files"]["full"], models / T2I_FILE)  # TencentARC's published layout
    shutil.copy(sd15["files"]["full"], models / "control_v11p_sd15_canny.pth")  # the tab's own model, same weights
    studio = Studio(ModelManager(str(sd15["root"] / "sd"), device="cpu", dtype="fp32"), str(models),
                    str(tmp_path / "out"))  # fmt: skip
    s = Settings(prompt="a red square", width=SIZE, height=SIZE, steps=3, cfg=5.0, sampler="ddim", seed=3,
                 randomize=False)  # fmt: skip
    unit = UnitSettings(BY_KEY["canny"], _hint(), "none", SIZE, scale=0.7, model=T2I_FILE, region=_left_half())
    quiet = lambda *a, **k: None  # noqa: E731
    request, _, _ = studio.request([unit], s, 3, quiet, family="SD1.5")
    got = request.units[0]
    assert got.model == str(models / T2I_FILE) and np.array_equal(got.mask, _left_half())
    assert got.control_type is ControlType.CANNY  # ignored by a T2I-Adapter; a Union would read it
    _, status, pngs = studio.generate([unit], s, quiet)
    assert f"ControlNet: {T2I_FILE} |" in status
    picture = np.asarray(Image.open(pngs[0]))
    lib = ControlUnit(str(models / T2I_FILE), _hint(), 0.7, preprocessor="none", mask=_left_half())
    same = GenerationRequest("a red square", units=(lib,), width=SIZE, height=SIZE, steps=3, cfg_scale=5.0, seed=3,
                             sampler="ddim")  # fmt: skip
    assert np.array_equal(picture, studio.manager.run(same).images[0])
    plain = studio.manager.run(replace(same, units=())).images[0]
    assert np.abs(picture.astype(int) - plain).max() > 8  # the adapter acted: the comparison is of something
    everywhere = studio.manager.run(replace(same, units=(replace(lib, mask=None),))).images[0]
    assert np.abs(picture.astype(int) - everywhere).max() > 2  # and only in its region
    # the default is the condition's own model, found as before: no control type, no region
    own, _, _ = studio.request([replace(unit, model=None, region=None)], s, 3, quiet, family="SD1.5")
    assert own.units[0].model == str(models / "control_v11p_sd15_canny.pth")
    assert own.units[0].control_type is None and own.units[0].mask is None


def test_positional_calls_of_before_and_a_call_with_a_model_and_region(running_app, tmp_path):
    from gradio_client import Client, handle_file

    from tests.test_app import SETTINGS, _rest, _unit

    client = Client(running_app[0], verbose=False)
    Image.fromarray(_hint()).save(tmp_path / "hint.png")
    Image.fromarray(_left_half()).save(tmp_path / "left.png")
    Image.fromarray(np.full((SIZE, SIZE, 3), 255, np.uint8)).save(tmp_path / "white.png")
    head = [*_unit(handle_file(str(tmp_path / "hint.png")), "none", (100, 200)), *SETTINGS.values(), *_rest()]

    def pixels(*tail) -> tuple[np.ndarray, str]:
        _, status, files = client.predict(*head, *tail, api_name="/canny_generate")
        return np.asarray(Image.open(files[0])), status

    before, status = pixels()  # the call of before: no model, no region
    assert "ControlNet: control_v11p_sd15_canny.safetensors |" in status
    assert np.array_equal(before, pixels(OWN_MODEL, None)[0])
    assert np.array_equal(before, pixels(OWN_MODEL, handle_file(str(tmp_path / "white.png")))[0])
    scribble = "control_v11p_sd15_scribble.safetensors"  # other weights than canny's
    picked, status = pixels(scribble, handle_file(str(tmp_path / "left.png")))
    assert f"ControlNet: {scribble} |" in status
    assert np.abs(picked.astype(int) - before).max() > 2
    assert not np.array_equal(picked, pixels(scribble, None)[0])  # the region counts
    with pytest.raises(Exception, match="does not fit the base model"):  # another family's file, refused
        pixels("control_v11p_sd15_lineart.safetensors", None)
    assert np.array_equal(before, pixels()[0])  # the server goes on
    # PNG info's Send to: the picked file back into the tab's Model list
    _, _, files = client.predict(*head, scribble, None, api_name="/canny_generate")
    values = client.predict(handle_file(files[0]), "canny", api_name="/png_info_send")
    assert scribble in values


def test_batch_rows_take_a_control_type_and_a_region(tmp_path):
    """The jobs file's per-unit columns: `control_type` (a Union's) and `mask` (a picture path, the region); a row
    without them keeps its fingerprint's fields as before."""
    from cldm.scale.jobs import read_jobs
    from cldm.scale.render import Setup, prepare
    from tests.conftest import DEMO_DIR

    Image.fromarray(_hint()).save(tmp_path / "hint.png")
    Image.fromarray(_left_half()).save(tmp_path / "left.png")
    (tmp_path / "jobs.csv").write_text("id,hint,controlnet,prompt,control_type,mask\n"
                                       "a,hint.png,canny,a square,depth,left.png\n"
                                       "b,hint.png,canny,a square,,\n"
                                       "c,hint.png,canny,a square,sideways,\n")  # fmt: skip
    jobs, bad = read_jobs(tmp_path / "jobs.csv")
    assert [j.id for j in jobs] == ["a", "b"] and "control_type must be one of openpose, depth" in bad[0].error
    assert jobs[0].control_type is ControlType.DEPTH and jobs[0].mask == str(tmp_path / "left.png")
    assert jobs[1].control_type is None and jobs[1].mask == ""
    assert jobs[0].fingerprint() != replace(jobs[0], mask="").fingerprint() != jobs[1].fingerprint()
    demo = Setup(str(DEMO_DIR / "shapes_sd.safetensors"), str(DEMO_DIR))
    unit = prepare(jobs[0], demo).request.units[0]
    assert unit.control_type is ControlType.DEPTH and np.array_equal(unit.mask, _left_half())
    assert prepare(jobs[1], demo).request.units[0].mask is None
