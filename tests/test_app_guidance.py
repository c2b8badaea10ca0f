"""The guidance extras in the app (issue 29): eta / TCD's gamma, CFG rescale, FreeU and PAG under each tab's
Settings, taken last by the endpoints (an API call may leave them out: then each is off), give the library's
picture with the same request fields."""

from __future__ import annotations

import shutil
from dataclasses import replace

import numpy as np
import pytest
from PIL import Image

from cldm.errors import InputError
from cldm.hints.conditions import BY_KEY
from cldm.models.family import SD15
from cldm.pipeline.request import ControlUnit, GenerationRequest
from studio.forms import GuidancePanel
from studio.settings import GuidanceSettings, Settings, UnitSettings
from tests.test_taesd import small_taesd  # noqa: F401 (the fixture: a tiny TAESD in the published layouts)

SIZE = 64


def _hint() -> np.ndarray:
    img = np.zeros((SIZE, SIZE, 3), np.uint8)
    img[16:48, 20:44] = 255
    return img


def test_left_out_values_are_off_and_bad_ones_are_named():
    names = ("eta", "cfg_rescale", "freeu", "pag_scale", "pag_layers")
    panel = GuidancePanel(dict.fromkeys(names), optional=names)
    assert panel.optional == ("eta", "cfg_rescale", "freeu", "pag_scale", "pag_layers")
    assert panel.read(iter([None] * 5)) == GuidanceSettings()  # an old client sends none of them
    off = GuidanceSettings().request_fields("SD1.5")
    assert off == dict(eta=0.0, cfg_rescale=0.0, pag_scale=0.0, freeu=None, pag_layers=("mid",))
    on = GuidanceSettings(0.3, 0.7, True, 3.0, "mid, up.block_0").request_fields("SDXL")
    assert on["freeu"].b1 == 1.3 and on["pag_layers"] == ("mid", "up.block_0")  # SDXL's published factors
    with pytest.raises(InputError, match="cfg_rescale must be a finite number"):
        panel.read(iter([0.0, float("nan"), None, None, None]))
    with pytest.raises(InputError, match="freeu must be true or false"):
        panel.read(iter([None, None, "yes", None, None]))


def test_the_extras_reach_the_request_and_give_the_library_picture(tiny_dirs, tmp_path):
    from cldm.runtime.manager import ModelManager
    from studio.service import Studio

    sd_dir, cn_dir = tiny_dirs
    models = tmp_path / "models"
    shutil.copytree(cn_dir, models / "canny-tiny")  # picked in the unit's Model list
    studio = Studio(ModelManager(str(sd_dir), device="cpu", dtype="fp32"), str(models), str(tmp_path / "out"))
    s = Settings(prompt="a red square", width=SIZE, height=SIZE, steps=4, cfg=5.0, sampler="tcd", seed=3,
                 randomize=False)  # fmt: skip
    unit = UnitSettings(BY_KEY["canny"], _hint(), "none", SIZE, scale=0.8, model="canny-tiny")
    extras = GuidanceSettings(eta=0.3, cfg_rescale=0.7, freeu=True, pag_scale=2.0, pag_layers="mid")
    quiet = lambda *a, **k: None  # noqa: E731
    request, _, _ = studio.request([unit], s, 3, quiet, family="SD1.5", guidance=extras)
    assert (request.eta, request.cfg_rescale, request.freeu, request.pag_scale, request.pag_layers) == (
        0.3, 0.7, SD15.freeu, 2.0, ("mid",))  # fmt: skip
    _, _, pngs = studio.generate([unit], s, quiet, guidance=extras)
    picture = np.asarray(Image.open(pngs[0]))
    lib = GenerationRequest("a red square", units=(ControlUnit(str(models / "canny-tiny"), _hint(), 0.8),),
                            width=SIZE, height=SIZE, steps=4, cfg_scale=5.0, sampler="tcd", seed=3, eta=0.3,
                            cfg_rescale=0.7, freeu=SD15.freeu, pag_scale=2.0)  # fmt: skip
    assert np.array_equal(picture, studio.manager.run(lib).images[0])
    plain = studio.manager.run(replace(lib, eta=0.0, cfg_rescale=0.0, freeu=None, pag_scale=0.0)).images[0]
    assert np.abs(picture.astype(int) - plain).max() > 4  # the extras acted: the comparison is of something
    # without extras (an old client): the picture of before
    _, _, pngs = studio.generate([unit], s, quiet)
    assert np.array_equal(np.asarray(Image.open(pngs[0])), plain)


def test_live_previews_use_a1111s_taesd_when_the_models_folder_has_one(tiny_dirs, small_taesd, tmp_path):  # noqa: F811
    """A1111's "TAESD" live preview: the family's decoder in models/VAE-taesd/ makes full-size previews; without
    one, or without previews, nothing is loaded for them."""
    from cldm.runtime.manager import ModelManager
    from studio.service import Studio
    from studio.settings import PassSettings

    sd_dir, cn_dir = tiny_dirs
    models = tmp_path / "models"
    shutil.copytree(cn_dir, models / "canny-tiny")
    studio = Studio(ModelManager(str(sd_dir), device="cpu", dtype="fp32"), str(models), str(tmp_path / "out"))
    s = Settings(prompt="a red square", width=SIZE, height=SIZE, steps=4, cfg=5.0, sampler="euler", seed=3,
                 randomize=False)  # fmt: skip
    unit = UnitSettings(BY_KEY["canny"], _hint(), "none", SIZE, model="canny-tiny")
    quiet = lambda *a, **k: None  # noqa: E731
    previews = PassSettings(preview_every=1)
    request, _, _ = studio.request([unit], s, 3, quiet, extras=previews, family="SD1.5")
    assert request.preview_vae is None  # no TAESD here: Approx cheap, at the latent size
    decoder = models / "VAE-taesd" / "taesd_decoder.pth"
    decoder.parent.mkdir()
    shutil.copy(small_taesd[2], decoder)  # madebyollin's published decoder file
    request, _, _ = studio.request([unit], s, 3, quiet, extras=previews, family="SD1.5")
    assert request.preview_vae == decoder
    assert studio.request([unit], s, 3, quiet, extras=PassSettings(), family="SD1.5")[0].preview_vae is None
    shots = []
    _, _, pngs = studio.generate([unit], s, quiet, extras=previews, preview=shots.append)
    assert len(shots) == 3 and shots[0].shape == (1, SIZE, SIZE, 3)  # full size, every step but the last
    without = Studio(ModelManager(str(sd_dir), device="cpu", dtype="fp32"), str(tmp_path / "empty"),
                     str(tmp_path / "out2"))  # fmt: skip
    shutil.copytree(cn_dir, tmp_path / "empty" / "canny-tiny")
    _, _, plain = without.generate([unit], s, quiet, extras=previews, preview=quiet)
    # the previews change nothing in the picture
    assert np.array_equal(np.asarray(Image.open(pngs[0])), np.asarray(Image.open(plain[0])))
