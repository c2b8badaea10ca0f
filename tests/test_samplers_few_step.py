"""The few-step samplers (LCM, TCD) and spacings (trailing, SGM Uniform) against diffusers' schedulers, with the
same weights and seed: schedules as tensors, then whole pictures through the ControlNet pipelines (<= 2/255)."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from cldm.errors import InputError
from cldm.io import checkpoints
from cldm.pipeline.infotext import parameters, parse_parameters
from cldm.pipeline.request import ControlUnit, GenerationRequest
from cldm.pipeline.stages import generate
from cldm.sampling import schedules
from cldm.sampling.samplers import SAMPLER_LABELS, SAMPLERS, make_sampler
from tests import tiny_families as tf

SIZE = 64
PIXEL_TOL = 2  # out of 255, per pixel
SIGMA_RTOL = 1e-6  # for sigmas diffusers computes in fp32 as we do
STEP_COUNTS = [1, 2, 3, 4, 6, 8, 25, 50]
TRAILING = [k for k in SAMPLERS if k.endswith("_trailing")]


def _hint(seed=0) -> np.ndarray:
    """A square with texture, so the ControlNet has something to read (tests/test_pipeline.py's hint)."""
    rng = np.random.RandomState(seed)
    img = np.zeros((SIZE, SIZE, 3), np.uint8)
    img[16:48, 16:48] = 255
    return np.clip(img.astype(int) + rng.randint(0, 60, img.shape), 0, 255).astype(np.uint8)


def _gen(sd, prompt, negative="", units=(), **kw):
    return generate(sd, GenerationRequest(prompt, negative, tuple(units), **kw))


def _diff(a, b) -> int:
    return int(np.abs(a.astype(int) - b.astype(int)).max())


def _config(pipe) -> dict:
    """The pipeline's first scheduler config (another test may have swapped its scheduler, as tests/test_pipeline.py)."""
    if not hasattr(pipe, "_first_scheduler_config"):
        pipe._first_scheduler_config = dict(pipe.scheduler.config)
    return pipe._first_scheduler_config


def _scheduler(name: str, config: dict, seed: int = 0):
    """diffusers' scheduler for our sampler key, from the SD1.5 config (the LCM / TCD pipelines' from_config)."""
    from diffusers import (
        DPMSolverMultistepScheduler,
        DPMSolverSDEScheduler,
        EulerAncestralDiscreteScheduler,
        EulerDiscreteScheduler,
        LCMScheduler,
        LMSDiscreteScheduler,
        TCDScheduler,
    )  # fmt: skip

    kinds = {
        "lcm": (LCMScheduler, {}),
        "tcd": (TCDScheduler, {}),
        "euler": (EulerDiscreteScheduler, {}),
        "euler_a": (EulerAncestralDiscreteScheduler, {}),
        "lms": (LMSDiscreteScheduler, {}),
        "dpmpp_2m": (DPMSolverMultistepScheduler, {}),
        "dpmpp_2m_sde": (DPMSolverMultistepScheduler, {"algorithm_type": "sde-dpmsolver++"}),
        "dpmpp_sde": (DPMSolverSDEScheduler, {"noise_sampler_seed": seed}),
    }  # fmt: skip
    kind = name.removesuffix("_trailing")
    cls, extra = kinds[kind]
    if kind != name:
        extra = {**extra, "timestep_spacing": "trailing"}
    return cls.from_config(config, **extra)


def _ref(pipe, name: str, seed: int, generator=None, **kw) -> np.ndarray:
    """diffusers' pictures with the scheduler of `name`; the pipeline's own scheduler goes back afterwards."""
    original = pipe.scheduler
    pipe.scheduler = _scheduler(name, _config(pipe), seed)
    try:
        gen = generator if generator is not None else torch.Generator("cpu").manual_seed(seed)
        out = pipe(generator=gen, output_type="np", width=SIZE, height=SIZE, **kw)
    finally:
        pipe.scheduler = original
    return (out.images * 255).round().astype(np.uint8)


# ---------------------------------------------------------------------------------------------- schedules
@pytest.mark.parametrize("steps", [*STEP_COUNTS, 61, 103])
def test_trailing_spacing_matches_diffusers(ref_pipe, steps):
    """Every sampler on trailing timesteps, schedule for schedule. At 61 and 103 steps diffusers' numpy arange makes
    one entry too many (a timestep -1 past the end); ours stops at `steps`, the entries before it equal."""
    config = _config(ref_pipe)
    for name in TRAILING:
        ref = _scheduler(name, config)
        ref.set_timesteps(steps)
        s = make_sampler(name, steps)
        n = len(s.timesteps)
        assert n == s.model_calls(steps), name
        # DPM++ SDE's midpoints are fractional, found from their sigmas in float64 on both sides
        assert torch.allclose(s.timesteps.double(), ref.timesteps[:n].double(), atol=1e-4, rtol=0), name
        assert torch.allclose(s.sigmas[:n], ref.sigmas[:n].float(), rtol=SIGMA_RTOL, atol=0), name
        assert s.sigmas[-1] == 0, name
        x = torch.ones(1)  # sigma_max for the sigma samplers (not sqrt(sigma_max^2 + 1)), 1 for DPM-Solver's VP form
        assert torch.allclose(s.init_noise(x), x * ref.init_noise_sigma, rtol=1e-6), name
    if steps in (61, 103):
        assert len(ref.timesteps) == steps + 1 and ref.timesteps[-1] == -1  # the quirk left off


def _sgm_uniform_reference(steps: int, alphas_cumprod: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """k-diffusion's published rule (A1111 modules/sd_schedulers.py sgm_uniform, ComfyUI normal_scheduler with
    sgm=True): timesteps linspace(t(sigma_max), t(sigma_min), n + 1)[:-1], each mapped to sigma by interpolating
    log sigma between the two trained timesteps around it, then a final 0. Written out here in fp32, as k-diffusion."""
    log_sigmas = (((1 - alphas_cumprod) / alphas_cumprod) ** 0.5).log()
    t = torch.linspace(len(log_sigmas) - 1, 0, steps + 1)[:-1]
    low, high, w = t.floor().long(), t.ceil().long(), t.frac()
    sigmas = ((1 - w) * log_sigmas[low] + w * log_sigmas[high]).exp()
    return torch.cat([sigmas, torch.zeros(1)]), t


@pytest.mark.parametrize("steps", STEP_COUNTS)
def test_sgm_uniform_follows_the_published_formula(ref_pipe, steps):
    from diffusers import DDPMScheduler

    sigmas, t = _sgm_uniform_reference(steps, DDPMScheduler.from_config(_config(ref_pipe)).alphas_cumprod)
    for name in [k for k in SAMPLERS if k.endswith("_sgm_uniform")]:
        s = make_sampler(name, steps)
        got_t, got_sigmas = s.timesteps, s.sigmas
        if s.order == 2:  # DPM++ SDE: midpoints between the timesteps, each later sigma twice
            got_t, got_sigmas = s.timesteps[::2], torch.cat([s.sigmas[:1], s.sigmas[1::2]])
        assert torch.allclose(got_t.float(), t, atol=1e-3), name
        assert torch.allclose(got_sigmas, sigmas, rtol=1e-5, atol=0), name
    assert torch.equal(schedules.trailing_timesteps(steps)[:1], t[:1].double())  # both start at 999


@pytest.mark.parametrize("kind", ["lcm", "tcd"])
@pytest.mark.parametrize("steps", STEP_COUNTS)
def test_lcm_and_tcd_timesteps_match_diffusers(ref_pipe, kind, steps):
    ref = _scheduler(kind, _config(ref_pipe))
    ref.set_timesteps(steps)
    assert torch.equal(make_sampler(kind, steps).timesteps, ref.timesteps)


def test_lcm_and_tcd_take_more_steps_than_the_distillation_schedule():
    """diffusers refuses more than 50 steps; here the schedule becomes that many evenly spaced timesteps, so every
    step count the request allows runs (999: each trained timestep once)."""
    for steps in (51, 999):
        t = make_sampler("lcm", steps).timesteps
        assert len(t) == steps and len(set(t.tolist())) == steps and (t[:-1] > t[1:]).all()
    assert make_sampler("lcm", 999).timesteps[-1] == 0


@pytest.mark.parametrize("gamma", [0.0, 0.3, 1.0])
def test_tcd_steps_match_diffusers_step_by_step(ref_pipe, gamma):
    """Both the deterministic (gamma 0) and the noisy paths, on a stand-in model, every step against the scheduler."""
    ref = _scheduler("tcd", _config(ref_pipe))
    ref.set_timesteps(4)
    s = make_sampler("tcd", 4, eta=gamma)
    g_ours, g_ref = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    x = torch.randn(2, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    y = x.clone()
    for i, t in enumerate(ref.timesteps):
        eps = torch.sin(x * (i + 1))  # a stand-in noise estimate that depends on the sample
        x = s.step(x, eps, i, g_ours)
        y = ref.step(torch.sin(y * (i + 1)), t, y, eta=gamma, generator=g_ref).prev_sample
        assert torch.allclose(x, y, atol=1e-5), (gamma, i)


def test_tcd_gamma_above_one_is_refused_before_sampling(ours):
    with pytest.raises(InputError, match="TCD's gamma"):
        _gen(ours[0], "a", steps=4, sampler="tcd", eta=1.5, width=SIZE, height=SIZE)
    with pytest.raises(ValueError, match="0..1"):
        make_sampler("tcd", 4, eta=1.5)


# ---------------------------------------------------------------------------------------------- pictures
# Euler, DPM++ 2M and DPM++ SDE on trailing timesteps in the fast tier; the rest in the integration tier (their
# schedules are checked above, their steps by tests/test_pipeline.py on the other schedules)
# the fast tier keeps one of each kind; the other variants run in the integration tier (the fast tier's 5 minutes)
FAST = (("lcm", 1.0), ("tcd", 1.0), ("euler_trailing", 1.5))
FEW_STEP = [
    (k, cfg, eta) if (k, cfg) in FAST else pytest.param(k, cfg, eta, marks=pytest.mark.integration)
    for k, cfg, eta in [("lcm", 1.0, 0.0), ("lcm", 1.5, 0.0), ("tcd", 1.0, 0.3), *((k, 1.5, 0.0) for k in TRAILING)]
]  # fmt: skip


@pytest.mark.parametrize(("sampler", "cfg", "eta"), FEW_STEP)
def test_few_step_pictures_match_diffusers(ours, ref_pipe, sampler, cfg, eta):
    """4 steps with a ControlNet and a batch of 2 from one generator; cfg 1 is diffusers' no-guidance path."""
    sd, cn = ours
    ref = _ref(ref_pipe, sampler, 5, prompt="a red square", negative_prompt="blurry", image=Image.fromarray(_hint()),
               num_inference_steps=4, guidance_scale=cfg, eta=eta, num_images_per_prompt=2)  # fmt: skip
    got = _gen(sd, "a red square", "blurry", [ControlUnit(cn, _hint())], steps=4, cfg_scale=cfg, sampler=sampler,
               eta=eta, seed=5, width=SIZE, height=SIZE, batch=2, emphasis=False)  # fmt: skip
    print(f"{sampler} cfg {cfg}: max difference {_diff(got.images, ref)}/255")
    assert _diff(got.images, ref) <= PIXEL_TOL, _diff(got.images, ref)
    assert ref.std() > 10
    assert _diff(got.images[0], got.images[1]) > 5  # the batch's pictures differ (their noise does)
    assert f"Sampler: {SAMPLER_LABELS[sampler]}," in got.parameters


def test_lcm_with_one_seed_per_picture_matches_diffusers_generator_list(ours, ref_pipe):
    """seed_per_picture: a generator per picture, and each step's fresh noise drawn row by row from them, as
    diffusers' randn_tensor does with a list of generators."""
    sd, cn = ours
    gens = [torch.Generator("cpu").manual_seed(7 + i) for i in range(2)]
    ref = _ref(ref_pipe, "lcm", 7, gens, prompt="a red square", image=Image.fromarray(_hint()), num_inference_steps=4,
               guidance_scale=1.0, num_images_per_prompt=2)  # fmt: skip
    got = _gen(sd, "a red square", "", [ControlUnit(cn, _hint())], steps=4, cfg_scale=1.0, sampler="lcm", seed=7,
               seed_per_picture=True, width=SIZE, height=SIZE, batch=2, emphasis=False)  # fmt: skip
    assert _diff(got.images, ref) <= PIXEL_TOL
    alone = _gen(sd, "a red square", "", [ControlUnit(cn, _hint())], steps=4, cfg_scale=1.0, sampler="lcm", seed=8,
                 width=SIZE, height=SIZE, emphasis=False)  # fmt: skip
    assert _diff(got.images[1], alone.images[0]) <= PIXEL_TOL  # picture 1 is the one seed 8 makes alone


def test_lcm_img2img_matches_diffusers(ours, ref_pipe):
    """img2img at strength 0.6 of 4 steps: the ControlNet img2img pipeline keeps the last int(4 * 0.6) = 2 of the
    full schedule and noises the init latent to the first of them."""
    from diffusers import StableDiffusionControlNetImg2ImgPipeline

    sd, cn = ours
    init = np.asarray(Image.fromarray(_hint(3)).convert("L").convert("RGB"))
    pipe = StableDiffusionControlNetImg2ImgPipeline(**ref_pipe.components)
    pipe.set_progress_bar_config(disable=True)
    pipe._first_scheduler_config = _config(ref_pipe)
    ref = _ref(pipe, "lcm", 5, prompt="a cat", image=Image.fromarray(init), control_image=Image.fromarray(_hint()),
               strength=0.6, num_inference_steps=4, guidance_scale=1.5, controlnet_conditioning_scale=1.0)  # fmt: skip
    out = _gen(sd, "a cat", "", [ControlUnit(cn, _hint())], steps=4, cfg_scale=1.5, seed=5, width=SIZE, height=SIZE,
               init_image=init, strength=0.6, sampler="lcm")  # fmt: skip
    assert _diff(out.images[0], ref[0]) <= PIXEL_TOL
    full = _gen(sd, "a cat", "", [ControlUnit(cn, _hint())], steps=4, cfg_scale=1.5, seed=5, width=SIZE, height=SIZE,
                sampler="lcm")  # fmt: skip
    assert _diff(out.images[0], full.images[0]) > 5  # the init picture mattered


def test_sgm_uniform_stays_close_to_trailing(ours):
    """4 steps of SGM Uniform (timesteps 999, 749.25, 499.5, 249.75) and of trailing (999, 749, 499, 249) nearly
    agree: the same spacing but for a quarter timestep."""
    sd, cn = ours
    kw = dict(steps=4, cfg_scale=1.5, seed=3, width=SIZE, height=SIZE, emphasis=False)
    sgm = _gen(sd, "a red square", "", [ControlUnit(cn, _hint())], sampler="euler_sgm_uniform", **kw)
    trailing = _gen(sd, "a red square", "", [ControlUnit(cn, _hint())], sampler="euler_trailing", **kw)
    leading = _gen(sd, "a red square", "", [ControlUnit(cn, _hint())], sampler="euler", **kw)
    assert _diff(sgm.images, trailing.images) <= 3
    assert _diff(leading.images, trailing.images) > 3 * _diff(sgm.images, trailing.images)  # the spacing matters


# ------------------------------------------------------------------------------------------ SD2 v and SDXL
@pytest.fixture(scope="module")
def sd2_v(tmp_path_factory):
    """A tiny SD2 v-prediction base and ControlNet, ours and diffusers' (tests/tiny_families.py)."""
    from diffusers import ControlNetModel, StableDiffusionControlNetPipeline

    root = tmp_path_factory.mktemp("sd2v")
    pipe_dir = tf.make_sd2_pipeline(root, prediction="v_prediction")
    cn_dir = tf.make_sd2_controlnet(root, pipe_dir)
    sd = checkpoints.load_sd(pipe_dir)
    ref = StableDiffusionControlNetPipeline.from_pretrained(
        pipe_dir, controlnet=ControlNetModel.from_pretrained(cn_dir), safety_checker=None,
        requires_safety_checker=False,
    )  # fmt: skip
    ref.set_progress_bar_config(disable=True)
    return sd, checkpoints.load_controlnet(cn_dir, base=sd.config.unet), ref


@pytest.fixture(scope="module")
def sdxl(tmp_path_factory):
    return tf.sdxl_with_reference(tmp_path_factory.mktemp("sdxl"), "StableDiffusionXLControlNetPipeline")


@pytest.mark.parametrize(("sampler", "eta"), [("lcm", 0.0), ("tcd", 0.3)])
def test_lcm_and_tcd_on_a_v_prediction_model_match_diffusers(sd2_v, sampler, eta):
    """A v model's output becomes a noise estimate at the step's own timestep (Sampler.noise_estimate); diffusers'
    schedulers take x0 from v directly: the same x0."""
    sd, cn, ref_pipe = sd2_v
    assert sd.config.prediction == "v"
    ref = _ref(ref_pipe, sampler, 8, prompt="a blue square", image=Image.fromarray(_hint(2)), num_inference_steps=4,
               guidance_scale=1.5, eta=eta)  # fmt: skip
    out = _gen(sd, "a blue square", "", [ControlUnit(cn, _hint(2))], steps=4, cfg_scale=1.5, seed=8, eta=eta,
               width=SIZE, height=SIZE, sampler=sampler)  # fmt: skip
    assert _diff(out.images[0], ref[0]) <= PIXEL_TOL
    assert ref.std() > 10


@pytest.mark.parametrize("sampler", ["lcm", "euler_trailing"])
def test_sdxl_few_step_samplers_match_diffusers(sdxl, sampler):
    """LCM-LoRA SDXL's and SDXL-Lightning's samplers on an SDXL base (the same training schedule as SD1.5)."""
    sd, cn, ref_pipe = sdxl
    ref = _ref(ref_pipe, sampler, 4, prompt="a cat", image=Image.fromarray(_hint()), num_inference_steps=4,
               guidance_scale=1.0)  # fmt: skip
    out = _gen(sd, "a cat", "", [ControlUnit(cn, _hint())], steps=4, cfg_scale=1.0, seed=4, width=SIZE, height=SIZE,
               sampler=sampler)  # fmt: skip
    assert _diff(out.images[0], ref[0]) <= PIXEL_TOL
    assert ref.std() > 10


# ---------------------------------------------------------------------------------------------- infotext
@pytest.mark.parametrize(
    ("written", "key"),
    [
        ("Sampler: Euler, Schedule type: SGM Uniform", "euler_sgm_uniform"),  # A1111 >= 1.9
        ("Sampler: Euler SGM Uniform", "euler_sgm_uniform"),  # as we write it (A1111 reads it too)
        ("Sampler: DPM++ SDE, Schedule type: SGM Uniform", "dpmpp_sde_sgm_uniform"),
        ("Sampler: Euler a Trailing", "euler_a_trailing"),
        ("Sampler: LCM", "lcm"),
        ("Sampler: LCM, Schedule type: Automatic", "lcm"),
        ("Sampler: TCD", "tcd"),
    ],
)
def test_few_step_samplers_read_back_from_a1111_text(written, key):
    assert parse_parameters(f"a cat\nSteps: 4, {written}, CFG scale: 1.0, Seed: 1").sampler == key


def test_every_new_label_round_trips_through_our_text(ours):
    for key in ["lcm", "tcd", *[k for k in SAMPLERS if k.endswith(("_trailing", "_sgm_uniform"))]]:
        r = GenerationRequest("a cat", steps=4, sampler=key, width=SIZE, height=SIZE)
        assert parse_parameters(parameters(ours[0], r)).sampler == key
