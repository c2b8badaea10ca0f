"""ControlNet Union / ProMax (xinsir's controlnet-union-sdxl-1.0 layout) against diffusers' ControlNetUnionModel and
StableDiffusionXLControlNetUnionPipeline, on tiny random weights written by diffusers in the published layout: a
folder (config.json + diffusion_pytorch_model.safetensors, 6 control types) and a bare ProMax file
(diffusion_pytorch_model_promax.safetensors, 8 types, no config).

Bound: pictures within 2/255 per pixel in fp32; residuals within 1e-4.
"""

from __future__ import annotations

import shutil
from dataclasses import replace

import numpy as np
import pytest
import torch
from PIL import Image

import annotators
from cldm.errors import CheckpointError, InputError
from cldm.hints.conditions import CONDITIONS
from cldm.io import checkpoints, identify, keymaps
from cldm.io.controlnet_union import is_promax
from cldm.io.files import read_file
from cldm.models.controlnet_union import ControlNetUnion, UnionHint
from cldm.pipeline.request import ControlUnit, GenerationRequest
from cldm.pipeline.stages import generate
from cldm.pipeline.union import ControlType, type_of_preprocessor
from tests import tiny_families as tf
from tests.test_pipeline import _ref
from tests.tiny import wake_zero_convs

pytestmark = pytest.mark.usefixtures("one_thread")
SIZE = 64
PIXEL_TOL = 2
PROMAX_FILE = "diffusion_pytorch_model_promax.safetensors"


def _hint(seed=0):
    rng = np.random.RandomState(seed)
    img = np.zeros((SIZE, SIZE, 3), np.uint8)
    img[16 + seed : 48, 8 : 40 + seed] = 255
    return np.clip(img.astype(int) + rng.randint(0, 60, img.shape), 0, 255).astype(np.uint8)


def _diff(a, b) -> int:
    return int(np.abs(a.astype(int) - b.astype(int)).max())


def _union(pipe_dir, control_types: int, seed: int):
    """A random diffusers ControlNetUnionModel for the tiny SDXL UNet, every zero-initialised part woken up."""
    from diffusers import ControlNetUnionModel

    ucfg = tf._unet_config(pipe_dir)
    keys = ("in_channels", "down_block_types", "block_out_channels", "layers_per_block", "cross_attention_dim",
            "attention_head_dim", "use_linear_projection", "transformer_layers_per_block", "addition_embed_type",
            "addition_time_embed_dim", "projection_class_embeddings_input_dim", "norm_num_groups")  # fmt: skip
    width = ucfg["block_out_channels"][0]
    torch.manual_seed(seed)
    cn = ControlNetUnionModel(
        **{k: ucfg[k] for k in keys}, conditioning_embedding_out_channels=tf.HINT_CHANNELS,
        num_control_type=control_types, num_trans_channel=width, num_proj_channel=width, num_trans_head=8,
    )  # fmt: skip
    wake_zero_convs(cn, seed + 100)
    g = torch.Generator().manual_seed(seed + 200)
    with torch.no_grad():
        for p in cn.spatial_ch_projs.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    return cn.eval()


@pytest.fixture(scope="module")
def union_dirs(tmp_path_factory):
    """(pipeline folder, Union folder holding the ProMax file too, diffusers Union, diffusers ProMax)."""
    root = tmp_path_factory.mktemp("union")
    pipe_dir = tf.make_sdxl_pipeline(root)
    union, promax = _union(pipe_dir, 6, seed=3), _union(pipe_dir, 8, seed=4)
    folder = root / "controlnet-union-sdxl-1.0"
    promax.save_pretrained(str(root / "promax"))
    union.save_pretrained(str(folder))
    shutil.copy(root / "promax" / "diffusion_pytorch_model.safetensors", folder / PROMAX_FILE)
    return pipe_dir, folder, union, promax


@pytest.fixture(scope="module")
def loaded(union_dirs):
    pipe_dir, folder, _, _ = union_dirs
    sd = checkpoints.load_sd(pipe_dir)
    union = checkpoints.load_controlnet(folder, base=sd.config.unet)
    promax = checkpoints.load_controlnet(folder / PROMAX_FILE, base=sd.config.unet)
    return sd, union, promax


@pytest.fixture(scope="module")
def ref_pipe(union_dirs):
    from diffusers import StableDiffusionXLControlNetUnionPipeline

    pipe_dir, _, union, _ = union_dirs
    pipe = StableDiffusionXLControlNetUnionPipeline.from_pretrained(pipe_dir, controlnet=union)
    pipe.set_progress_bar_config(disable=True)
    return pipe


def _request(units, **kw) -> GenerationRequest:
    args = dict(steps=5, cfg_scale=5.0, seed=3, width=SIZE, height=SIZE, sampler="euler_a") | kw
    return GenerationRequest("a red circle", "", tuple(units), **args)


# ------------------------------------------------------------------------------------------------ the files
def test_union_and_promax_are_told_from_their_keys_and_load_strictly(union_dirs, loaded):
    _, folder, union_ref, _ = union_dirs
    sd, union, promax = loaded
    published = read_file(folder / PROMAX_FILE)
    assert identify.weight_kind(published) is identify.WeightKind.CONTROLNET_UNION
    assert isinstance(union, ControlNetUnion) and isinstance(promax, ControlNetUnion)
    assert union.union.control_types == 6 and not is_promax(union.union)
    assert promax.union.control_types == 8 and is_promax(promax.union)
    # our keys are the published keys after the diffusers ControlNet table, one for one, tensor for tensor
    theirs = keymaps.to_diffusers(promax.state_dict(), keymaps.controlnet_modules(promax.cfg))
    assert theirs.keys() == published.keys()
    assert all(torch.equal(theirs[k], published[k]) for k in published)
    assert union.cfg.adm_in_channels == sd.config.unet.adm_in_channels and union.cfg.depth(2) == 3


@pytest.mark.parametrize("n_conditions", [1, 2])
def test_union_residuals_match_diffusers(union_dirs, loaded, n_conditions):
    _, _, union_ref, _ = union_dirs
    _, union, _ = loaded
    g = torch.Generator().manual_seed(0)
    x, ctx = torch.randn(2, 4, 8, 8, generator=g), torch.randn(2, 5, 80, generator=g)
    text, ids = torch.randn(2, 40, generator=g), torch.tensor([[64.0, 64, 0, 0, 64, 64]] * 2)
    hints = [torch.rand(1, 3, SIZE, SIZE, generator=g) for _ in range(n_conditions)]
    types, scales = [3, 1][:n_conditions], [0.7, 1.3][:n_conditions]
    one_hot = torch.zeros(2, 6)
    one_hot[:, types] = 1
    t = torch.tensor(500)
    with torch.no_grad():
        down, mid = union_ref(x, t, ctx, [h.expand(2, -1, -1, -1) for h in hints], one_hot, types,
                              conditioning_scale=scales, added_cond_kwargs={"text_embeds": text, "time_ids": ids},
                              return_dict=False)  # fmt: skip
        features = tuple(union.embed_hint(h) for h in hints)
        hint = UnionHint(features, tuple(types), None if n_conditions == 1 else tuple(scales))
        y = torch.cat([text, _size_embedding(union, ids)], dim=1)
        ours = union(x, t, ctx, hint, y)
    if n_conditions == 1:
        ours = [o * scales[0] for o in ours]
    for a, b in zip(ours, [*down, mid]):
        assert (a - b).abs().max() < 1e-4


def _size_embedding(cn, ids):
    from cldm.models.unet import timestep_embedding

    return timestep_embedding(ids.flatten(), cn.cfg.size_embed_dim).reshape(ids.shape[0], -1)


# ------------------------------------------------------------------------------------------------ pictures
def test_one_condition_matches_diffusers(loaded, ref_pipe):
    sd, union, _ = loaded
    ref = _ref(ref_pipe, "euler_a", prompt="a red circle", control_image=[Image.fromarray(_hint())],
               control_mode=[3], num_inference_steps=5, guidance_scale=5.0, seed=3,
               controlnet_conditioning_scale=0.8)  # fmt: skip
    out = generate(sd, _request([ControlUnit(union, _hint(), scale=0.8, preprocessor="canny")]))
    assert _diff(out.images[0], ref[0]) <= PIXEL_TOL
    # the type matters: the same hint read as a depth map is another picture
    depth = generate(sd, _request([ControlUnit(union, _hint(), scale=0.8, preprocessor="depth_midas")]))
    assert _diff(depth.images[0], ref[0]) > 4 * PIXEL_TOL


def test_two_conditions_in_one_forward_match_diffusers(loaded, ref_pipe):
    sd, union, _ = loaded
    ref = _ref(ref_pipe, "euler_a", prompt="a red circle",
               control_image=[Image.fromarray(_hint()), Image.fromarray(_hint(5))], control_mode=[3, 1],
               num_inference_steps=5, guidance_scale=5.0, seed=3, controlnet_conditioning_scale=[0.7, 1.2],
               control_guidance_start=[0.0, 0.2], control_guidance_end=[1.0, 0.8])  # fmt: skip
    units = [ControlUnit(union, _hint(), scale=0.7, preprocessor="lineart"),
             ControlUnit(union, _hint(5), scale=1.2, start=0.2, end=0.8, control_type="depth")]  # fmt: skip
    out = generate(sd, _request(units))
    assert _diff(out.images[0], ref[0]) <= PIXEL_TOL
    # one Union forward with two conditions is not the sum of two one-condition runs
    apart = generate(sd, _request(units[:1])).images[0].astype(int) - generate(sd, _request([])).images[0]
    assert _diff(out.images[0], generate(sd, _request(units[1:])).images[0] + apart) > 4 * PIXEL_TOL


def test_promax_tile_and_repaint_match_diffusers(union_dirs, loaded, ref_pipe):
    _, _, union_ref, promax_ref = union_dirs
    sd, _, promax = loaded
    ref_pipe.controlnet = promax_ref
    try:
        tile = _ref(ref_pipe, "euler_a", prompt="a red circle", control_image=[Image.fromarray(_hint(2))],
                    control_mode=[6], num_inference_steps=5, guidance_scale=5.0, seed=3)  # fmt: skip
        holed = _hint(2).copy()
        holed[20:40, 20:40] = 0  # diffusers' repaint rule: the masked pixels black
        repaint = _ref(ref_pipe, "euler_a", prompt="a red circle", control_image=[Image.fromarray(holed)],
                       control_mode=[7], num_inference_steps=5, guidance_scale=5.0, seed=3)  # fmt: skip
    finally:
        ref_pipe.controlnet = union_ref
    out = generate(sd, _request([ControlUnit(promax, _hint(2), control_type="tile")]))
    assert _diff(out.images[0], tile[0]) <= PIXEL_TOL
    # our inpaint hint marks the holes -1 (the ControlNet 1.1 rule); a Union reads them as black
    hint = torch.from_numpy(_hint(2)).permute(2, 0, 1)[None].float() / 255
    hint[:, :, 20:40, 20:40] = -1
    out = generate(sd, _request([ControlUnit(promax, hint, preprocessor="inpaint")]))
    assert _diff(out.images[0], repaint[0]) <= PIXEL_TOL


# ------------------------------------------------------------------------------------------- types, refusals
def test_control_type_rule():
    want = {"openpose": 0, "openpose_full": 0, "dwpose": 0, "depth_midas": 1, "depth_zoe": 1, "depth_anything_v2": 1,
            "softedge_pidinet": 2, "softedge_hed": 2, "scribble_sketch": 2, "scribble_hed": 2, "teed": 2,
            "canny": 3, "lineart": 3, "lineart_anime": 3, "lineart_coarse": 3, "mlsd": 3, "normal_bae": 4,
            "normalbae": 4, "seg_ade20k": 5, "seg": 5, "tile": 6, "inpaint": 7}  # fmt: skip
    assert {k: type_of_preprocessor(k).index for k in want} == want
    for name in ("none", "invert", "shuffle", "ip2p", ""):
        assert type_of_preprocessor(name) is None
    # every preprocessor of the app and every condition is either typed or knowingly without a type
    untyped = {"none", "invert", "shuffle", "ip2p"}
    names = set(annotators.ANNOTATORS) | {c.key for c in CONDITIONS}
    assert {n for n in names if type_of_preprocessor(n) is None} <= untyped
    # names, A1111's labels and diffusers' numbers all name a type
    assert ControlType.parse("Hard Edge") is ControlType("canny") is ControlType(3) is ControlType.CANNY
    assert ControlType("scribble") is ControlType.SOFTEDGE and ControlType.REPAINT.index == 7
    with pytest.raises(InputError, match="control_type"):
        GenerationRequest("a", units=(ControlUnit("x.safetensors", _hint(), control_type="sketchy"),)).validate()


def test_union_unit_without_a_type_or_with_a_promax_type_is_refused(loaded):
    sd, union, _ = loaded
    with pytest.raises(InputError, match="names no control type: give control_type"):
        generate(sd, _request([ControlUnit(union, _hint(), preprocessor="invert")]))
    with pytest.raises(InputError, match="tile needs a ProMax"):
        generate(sd, _request([ControlUnit(union, _hint(), control_type="tile")]))


def test_union_on_an_sd15_base_is_refused_before_sampling(union_dirs, tiny_dirs, loaded):
    from cldm.runtime.manager import ModelManager

    _, folder, _, _ = union_dirs
    _, union, _ = loaded
    manager = ModelManager(str(tiny_dirs[0]), device="cpu", dtype="fp32")
    with pytest.raises(CheckpointError, match="SDXL.*Use a ControlNet made for SD1.5"):
        manager.controlnet(str(folder / PROMAX_FILE))
    sd15 = manager.sd
    with pytest.raises(InputError, match="SDXL"):
        generate(sd15, GenerationRequest("a", units=(ControlUnit(union, _hint(), preprocessor="canny"),), steps=1,
                                         width=SIZE, height=SIZE))  # fmt: skip


def test_command_line_runs_a_union_with_a_control_type(union_dirs, ref_pipe, tmp_path):
    from cldm.__main__ import main

    pipe_dir, folder, _, _ = union_dirs
    Image.fromarray(_hint()).save(tmp_path / "hint.png")
    args = ["generate", "--dtype", "fp32", "--device", "cpu", "--base", str(pipe_dir), "--controlnet", str(folder),
            "--hint", str(tmp_path / "hint.png"), "--control-type", "canny", "--prompt", "a red circle", "--steps",
            "5", "--cfg", "5", "--seed", "3", "--sampler", "euler_a", "--width", str(SIZE), "--height", str(SIZE),
            "--out", str(tmp_path / "out.png")]  # fmt: skip
    assert main(args) == 0
    ref = _ref(ref_pipe, "euler_a", prompt="a red circle", control_image=[Image.fromarray(_hint())],
               control_mode=[3], num_inference_steps=5, guidance_scale=5.0, seed=3)  # fmt: skip
    assert _diff(np.asarray(Image.open(tmp_path / "out.png")), ref[0]) <= PIXEL_TOL


def test_a_union_group_runs_in_every_control_mode_and_guess_mode(loaded):
    sd, union, _ = loaded
    units = [ControlUnit(union, _hint(), scale=0.7, preprocessor="canny"),
             ControlUnit(union, _hint(5), scale=1.2, preprocessor="depth_midas")]  # fmt: skip
    balanced = generate(sd, _request(units, steps=2, batch=2)).images
    for mode in ("prompt", "control"):
        out = generate(sd, _request([replace(units[0], mode=mode), units[1]], steps=2, batch=2)).images
        assert out.shape == balanced.shape and _diff(out, balanced) > PIXEL_TOL
    guessed = generate(sd, _request(units, steps=2, batch=2, guess_mode=True)).images
    assert _diff(guessed, balanced) > PIXEL_TOL
