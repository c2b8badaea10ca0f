"""The shapes data generator, its tokenizer, and a few steps of every training stage on the tiny family."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch

from cldm.errors import InputError
from cldm.io import checkpoints, files
from cldm.io.model_card import card_for
from cldm.models.config import SDConfig
from cldm.pipeline import prompts
from cldm.pipeline.request import ControlUnit, GenerationRequest
from cldm.pipeline.stages import generate
from cldm.sampling.schedules import TRAIN_STEPS, alphas_cumprod
from cldm.training.charts import line_chart
from cldm.training.export import demo_card, export
from cldm.training.metrics import canny_edges, edge_f1
from cldm.training.recipe import (
    COOLDOWN_FACTOR,
    DEMO_PHASES,
    DEMO_SCHEDULE,
    DEMO_STARTS,
    PLAIN,
    Phase,
    cooldown_phases,
    phase_at,
)
from cldm.training.shapes import (
    CAPTION_WORDS,
    CLASS_NAMES,
    COLORS,
    HINTS,
    MAX_OVERLAP,
    OVERLAPPING,
    SEG_PALETTE,
    SHAPES,
    SUPERSAMPLE,
    TILE_FACTORS,
    make_sample,
    make_scene,
    shape_mask,
    tile_hint,
)
from cldm.training.train import (
    CONTROLNET_FILE,
    MIN_SNR_GAMMA,
    SD_FILE,
    VAE_FILE,
    TrainOptions,
    _noisy,
    eps_loss,
    family,
    load_vae,
    train_base,
    train_controlnet,
    train_vae,
)
from cldm.training.vocab import shapes_tokenizer

SEEDS = range(40)


# ------------------------------------------------------------------------------------------------ data
def test_generator_is_deterministic_at_every_size():
    for size in (32, 64, 256):
        a, b = make_sample(7, size), make_sample(7, size)
        assert a.caption == b.caption
        for name in ("image", "canny", "scribble", "seg", "labels", "tile", "inpaint", "shuffle"):
            assert np.array_equal(getattr(a, name), getattr(b, name))
    assert make_sample(1).caption != make_sample(2).caption or not np.array_equal(
        make_sample(1).image, make_sample(2).image
    )
    with pytest.raises(ValueError):
        make_sample(0, 16)


def test_pictures_without_hints_are_the_same_pictures():
    for seed in range(6):
        full, bare = make_sample(seed), make_sample(seed, hints=False)
        assert bare.caption == full.caption and np.array_equal(bare.image, full.image)
        assert np.array_equal(bare.labels, full.labels) and bare.canny is None
        with pytest.raises(ValueError, match="without its hints"):
            bare.hint("scribble")


def test_captions_name_what_is_drawn():
    for seed in SEEDS:
        s = make_sample(seed)
        assert 1 <= len(s.shapes) <= 3
        for shape in s.shapes:
            assert f"{shape.color} {shape.kind}" in s.caption
            assert shape.color not in s.background  # visible against the background
        assert s.caption.endswith(f"{' and '.join(s.background)} background")
        # the drawn colours are really in the picture: the shape's centre pixel has its colour
        for shape in s.shapes:
            x, y = (int(c) for c in shape.center)
            if shape.kind != "ring" and s.labels[y, x] == CLASS_NAMES.index(shape.kind):
                assert np.abs(s.image[y, x].astype(int) - COLORS[shape.color]).max() <= 2


def test_hints_shapes_ranges_and_seg_palette():
    for seed in SEEDS[:10]:
        s = make_sample(seed, 64)
        for name in ("canny", "scribble", "seg"):
            hint = s.hint(name)
            assert hint.shape == (64, 64, 3) and hint.dtype == np.uint8
        for name in ("canny", "scribble"):  # white strokes on black
            assert set(np.unique(s.hint(name))) <= {0, 255}
            assert (s.hint(name) > 0).any()
        assert np.array_equal(s.seg, SEG_PALETTE[s.labels])
        present = {CLASS_NAMES[c] for c in np.unique(s.labels)}
        assert present - {"background"} <= {sh.kind for sh in s.shapes}
        # every shape but a thin one shows its class colour somewhere in the seg map
        for shape in s.shapes:
            color = SEG_PALETTE[CLASS_NAMES.index(shape.kind)]
            assert (s.seg == color).all(axis=-1).any()
    assert len({tuple(c) for c in SEG_PALETTE}) == len(SEG_PALETTE) == 1 + len(SHAPES)


def test_tokenizer_has_one_token_per_caption_word(tmp_path):
    tok = shapes_tokenizer()
    unk = tok.unk_token_id
    for word in CAPTION_WORDS:
        ids = tok(word, add_special_tokens=False)["input_ids"]
        assert len(ids) == 1 and ids[0] != unk, word
    for seed in SEEDS:
        cap = make_sample(seed).caption
        ids = tok(cap, add_special_tokens=False, truncation=False, verbose=False)["input_ids"]
        assert unk not in ids and len(ids) == len(cap.replace(",", " ,").split())
    assert unk not in tok("Something else entirely!", add_special_tokens=False)["input_ids"]
    tok.save_pretrained(str(tmp_path))  # what a diffusers folder ships
    from transformers import CLIPTokenizer

    again = CLIPTokenizer.from_pretrained(str(tmp_path), local_files_only=True)
    assert again("a red star")["input_ids"] == tok("a red star")["input_ids"]


def test_demo_prompts_keep_only_caption_words():
    split_known = demo_card().split_known
    assert split_known("A green triangle on a white background, best quality") == (
        "a green triangle on a white background",
        ["best", "quality"],
    )
    caption = make_sample(11).caption
    assert split_known(caption) == (caption, [])
    assert split_known("masterpiece!") == ("", ["masterpiece"])


def test_edge_f1_and_chart(tmp_path):
    s = make_sample(3)
    ref = canny_edges(s.image)
    assert edge_f1(ref, ref) == 1.0
    shifted = np.roll(ref, 2, axis=1)
    assert edge_f1(shifted, ref) > 0.9 > edge_f1(np.roll(ref, 6, axis=1), ref)
    assert edge_f1(np.zeros_like(ref), ref) == 0.0
    line_chart({"loss": {"loss": [(1, 2.0), (2, 1.0), (3, 0.5)]}, "empty": {}}, tmp_path / "c.png")
    assert (tmp_path / "c.png").stat().st_size > 0


def test_two_shape_scenes_are_the_most_common_and_shapes_overlap_in_some():
    samples = [make_sample(seed, 32, hints=False) for seed in range(400)]
    counts = np.bincount([len(s.shapes) for s in samples], minlength=4)
    assert counts[0] == 0 and counts[3] > 0
    assert counts[2] > counts[1] > 0.2 * 400 and counts[2] > counts[3]
    # one shape per kind, so "a blue circle and a yellow star" says which colour goes where
    assert all(len({sh.kind for sh in s.shapes}) == len(s.shapes) for s in samples)
    overlapping = 0
    for s in samples[:120]:
        masks = [shape_mask(sh, 32 * SUPERSAMPLE) for sh in s.shapes]
        shared = [
            int((a & b).sum()) / min(int(a.sum()), int(b.sum())) for i, a in enumerate(masks) for b in masks[i + 1 :]
        ]
        assert all(f <= OVERLAPPING + 1e-9 for f in shared)
        overlapping += any(f > MAX_OVERLAP for f in shared)
    assert overlapping >= 10


def test_scenes_as_asked_and_drawn_from_named_shapes():
    for seed in range(20):
        s = make_sample(seed, 64, count=2, two_tone=False)
        assert len(s.background) == 1 and len(s.shapes) <= 2
    again = make_scene(s.shapes, s.background, 64)
    assert np.array_equal(again.image, s.image) and np.array_equal(again.labels, s.labels)
    assert again.caption == s.caption


def test_tile_inpaint_and_shuffle_hints():
    for seed in range(8):
        s = make_sample(seed, 64)
        assert s.tile.shape == s.shuffle.shape == (64, 64, 3) and s.tile.dtype == s.shuffle.dtype == np.uint8
        # the tile hint is the picture, shrunk and blown up again: close in colour
        assert np.abs(s.tile.astype(int) - s.image).mean() < 40
        assert any(np.array_equal(s.tile, tile_hint(s.image, f)) for f in TILE_FACTORS)
        # inpaint: -1 in the hole, the picture in [0, 1] elsewhere, holes of a usable size
        assert s.inpaint.dtype == np.float32 and 0.03 < s.hole.mean() < 0.7
        assert (s.inpaint[s.hole] == -1).all()
        assert np.allclose(s.inpaint[~s.hole], s.image[~s.hole] / 255.0)
        # shuffle: the picture's own colours, moved around
        assert not np.array_equal(s.shuffle, s.image)
        palette = np.array([COLORS[c] for c in (*s.background, *(sh.color for sh in s.shapes))])
        nearest = np.abs(s.shuffle.reshape(-1, 1, 3).astype(int) - palette[None]).max(axis=2).min(axis=1)
        assert (nearest <= 30).mean() > 0.8
    assert np.array_equal(tile_hint(s.image, 1), s.image)


def test_demo_text_context_is_32_tokens_with_30_token_chunks():
    from cldm.models.sd import random_sd

    fam = family("tiny")
    assert fam.text.max_length == 32
    sd = random_sd(SDConfig(fam.unet, fam.vae, fam.text), shapes_tokenizer())
    longest = "a purple diamond, an orange triangle and a yellow square on a white and black background"
    ids = prompts.token_chunks(sd.text, [longest])
    assert ids.shape == (1, 1, 32) and ids[0, 0, 20] == shapes_tokenizer().eos_token_id  # 19 words + BOS + EOS
    assert prompts.token_chunks(sd.text, ["a red circle " * 12]).shape == (1, 2, 32)  # 36 tokens: two chunks of 30
    assert prompts.encode(sd.text, ["a red circle " * 12]).shape == (1, 64, fam.text.hidden_size)


# --------------------------------------------------------------------------------------------- training
def test_cubic_timesteps_favour_high_noise_and_min_snr_weights():
    g = torch.Generator().manual_seed(0)
    mean = torch.zeros(4000, 1, 1, 1)
    _, t_uniform, _ = _noisy(mean, mean, g)
    _, t_cubic, _ = _noisy(mean, mean, g, cubic=True)
    assert 0 <= t_cubic.min() and t_cubic.max() <= TRAIN_STEPS - 1
    assert abs(t_uniform.float().mean() - 500) < 25 and t_cubic.float().mean() > 700  # E[1 - u^3] = 0.75
    eps, pred = torch.zeros(2, 4, 2, 2), torch.ones(2, 4, 2, 2)  # squared error 1 everywhere
    a = alphas_cumprod()
    t = torch.tensor([999, 10])  # SNR far below 5, and far above it
    snr_low_noise = float(a[10] / (1 - a[10]))
    assert eps_loss(pred, eps, t, gamma=None) == pytest.approx(1.0)
    assert eps_loss(pred, eps, t) == pytest.approx((1.0 + MIN_SNR_GAMMA / snr_low_noise) / 2)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """VAE, base and a canny ControlNet trained for a few steps on the tiny family (32 px)."""
    run = tmp_path_factory.mktemp("run")
    o = TrainOptions(
        run=run, preset="tiny", steps=4, batch=4, warmup=1, pool=8, ckpt_every=2, eval_every=4, eval_samples=1,
        sample_steps=2,
    )  # fmt: skip
    train_vae(o)
    train_base(o)
    train_controlnet(o, "canny")
    return o


def _log(folder: Path) -> list[dict]:
    return [json.loads(line) for line in (folder / "log.jsonl").read_text().splitlines()]


def test_stages_write_logs_samples_and_loadable_weights(trained, tmp_path):
    run = trained.run
    for stage in ("vae", "base", "controlnet_canny"):
        entries = _log(run / stage)
        assert [e["step"] for e in entries] == [1, 2, 3, 4]
        assert all(np.isfinite(e["loss"]) for e in entries)
        assert (run / stage / "curves.png").is_file() and list((run / stage / "samples").glob("*.png"))
    assert "psnr" in _log(run / "vae")[-1] and "f1_on" in _log(run / "controlnet_canny")[-1]
    vae = load_vae(run / "vae" / VAE_FILE)
    assert vae.cfg.scale_factor > 0
    sd = checkpoints.load_sd(run / "base" / SD_FILE, tokenizer=shapes_tokenizer())
    assert sd.config.vae.scale_factor == pytest.approx(vae.cfg.scale_factor)
    cn = checkpoints.load_controlnet(run / "controlnet_canny" / CONTROLNET_FILE)
    assert cn.hint_factor == sd.latent_factor
    hint = make_sample(5, 64).canny
    request = GenerationRequest("a red circle on a blue background", units=[ControlUnit(cn, hint)], steps=2, width=64,
                                height=64)  # fmt: skip
    assert generate(sd, request).images.shape == (1, 64, 64, 3)
    exported = export(run, tmp_path / "demo", hints=("canny",))
    names = ["shapes_sd.safetensors", "control_v11p_sd15_canny.safetensors", "model_card.json"]
    assert [f.name for f in exported] == names
    card = card_for(exported[0])  # the card names the ControlNets that were exported, and the demo settings
    assert card == demo_card(("canny",)) and card.conditions == ("canny",) and card.folder == tmp_path / "demo"
    assert card_for(tmp_path / "demo" / "control_v11p_sd15_canny.safetensors") is None  # a card is for its base only
    half = files.read_file(exported[0])
    assert all(v.dtype == torch.float16 for v in half.values() if v.is_floating_point())
    sd16 = checkpoints.load_sd(exported[0], tokenizer=shapes_tokenizer())  # fp16 on disk, cast back on load
    assert sd16.dtype == torch.float32
    assert (tmp_path / "demo" / "tokenizer").is_dir()
    curves = sorted(f.name for f in (tmp_path / "demo" / "report").iterdir())
    assert curves == ["curves_base.png", "curves_controlnet_canny.png", "curves_vae.png"]
    assert (tmp_path / "demo" / "report" / "curves_base.png").read_bytes() == (run / "base" / "curves.png").read_bytes()


def test_controlnets_share_one_encoded_pool(trained):
    from dataclasses import replace

    from cldm.training.train import controlnet_pool

    pool = controlnet_pool(trained, ("canny", "scribble"))
    mean, std, captions, hints = pool.get([3, 1], "scribble")
    assert mean.shape == std.shape and mean.shape[0] == 2 and captions == [make_sample(i, 32).caption for i in (3, 1)]
    assert torch.equal(hints[0], torch.from_numpy(make_sample(3, 32).scribble).permute(2, 0, 1).float() / 255)
    assert torch.equal(pool.get([3], "canny")[0], mean[:1])  # the same latent, not encoded again
    with pytest.raises(ValueError, match="not 'seg'"):
        pool.get([0], "seg")
    path = train_controlnet(replace(trained, steps=2), "scribble", pool)
    assert [e["step"] for e in _log(path.parent)] == [1, 2]


def test_resume_continues_from_the_saved_step(trained):
    from dataclasses import replace

    before = files.read_file(trained.run / "controlnet_canny" / CONTROLNET_FILE)
    train_controlnet(replace(trained, steps=6), "canny")
    entries = _log(trained.run / "controlnet_canny")
    assert [e["step"] for e in entries] == [1, 2, 3, 4, 5, 6]
    after = files.read_file(trained.run / "controlnet_canny" / CONTROLNET_FILE)
    assert any(not torch.equal(before[k], after[k]) for k in before)
    state = torch.load(trained.run / "controlnet_canny" / "optimizer.pt", weights_only=True)
    assert state["step"] == 6


def _copy_base(src: Path, dst: Path) -> None:
    """The trained VAE and base of run `src` into run `dst` (weights only: a ControlNet stage reads nothing else)."""
    for stage in ("vae", "base"):
        (dst / stage).mkdir(parents=True, exist_ok=True)
        for f in (src / stage).glob("*.safetensors"):
            (dst / stage / f.name).write_bytes(f.read_bytes())


def test_controlnet_phases_set_learning_rate_and_empty_captions_by_step(trained, monkeypatch, one_thread):
    """A phased ControlNet run: each step's learning rate and share of dropped captions come from its phase, steps
    past the last phase keep its settings, and a run resumed mid-way goes on as an uninterrupted one, bit for bit
    on one thread (on two, oneDNN may split a reduction differently in the resumed process)."""
    from dataclasses import replace

    from cldm.training import train as train_module

    shares, drop = [], train_module._drop_captions
    monkeypatch.setattr(train_module, "_drop_captions", lambda c, p, g: shares.append(p) or drop(c, p, g))
    phases = (Phase(2), Phase(4, COOLDOWN_FACTOR, 0.05), Phase(5, 1.0, 0.0))
    once = replace(trained, run=trained.run / "once", steps=6, phases=phases, eval_every=100)
    _copy_base(trained.run, once.run)
    path = train_controlnet(once, "seg")
    assert [e["lr"] for e in _log(path.parent)] == pytest.approx([1e-3, 1e-3, 1e-4, 1e-4, 1e-3, 1e-3])
    assert shares == [0.3, 0.3, 0.05, 0.05, 0.0, 0.0]
    twice = replace(once, run=trained.run / "twice")
    _copy_base(once.run, twice.run)
    train_controlnet(replace(twice, steps=3), "seg")  # interrupted inside the cool-down, then resumed
    resumed = train_controlnet(twice, "seg")
    a, b = files.read_file(path), files.read_file(resumed)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_controlnet_starts_from_another_hints_controlnet(trained, one_thread, tmp_path):
    """`init`: a ControlNet begins as another hint's (one Adam step away from it after one step, where a new one
    would begin with its zero convolutions at zero); a ControlNet of another shape is refused, and `train_all`
    names the ControlNet to train first when its start is missing, before training anything."""
    from dataclasses import replace

    from cldm.training.train import train_all

    canny_path = trained.run / "controlnet_canny" / CONTROLNET_FILE
    canny = files.read_file(canny_path)
    zero_convs = [k for k in canny if "zero_convs" in k or "middle_block_out" in k]
    assert zero_convs and any(canny[k].abs().max() > 2e-3 for k in zero_convs)
    o = replace(trained, run=tmp_path / "run", steps=1, eval_every=100, init=canny_path)
    _copy_base(trained.run, o.run)
    tile = files.read_file(train_controlnet(o, "tile"))
    assert tile.keys() == canny.keys()
    assert max((tile[k] - canny[k]).abs().max().item() for k in canny) <= 1.5e-3  # one step at lr 1e-3
    assert any(tile[k].abs().max() > 2e-3 for k in zero_convs)  # a new one's are within one step (1e-3) of 0
    with pytest.raises(InputError, match="not a ControlNet of this base for the shuffle hint"):
        train_controlnet(o, "shuffle")  # shuffle's ControlNet pools its residuals: another shape of ControlNet
    fresh = replace(o, run=tmp_path / "fresh", init=None)
    for hints in (("seg",), ("seg", "scribble")):  # scribble not trained, or trained after seg
        with pytest.raises(InputError, match="starts from the scribble one: train that first"):
            train_all(fresh, {"vae": 4, "base": 4, "controlnet": 1}, hints, starts={"seg": "scribble"})
    assert not fresh.run.exists()  # refused before any training


def test_demo_recipe_phases_and_cooldown_phases():
    assert phase_at((), 123) == PLAIN and PLAIN.empty_captions == 0.3 and PLAIN.lr_factor == 1.0
    assert cooldown_phases(10, 4) == (Phase(6), Phase(10, COOLDOWN_FACTOR))
    assert cooldown_phases(10, 0) == (Phase(10),)
    assert [phase_at(cooldown_phases(10, 4, 0.05), s) for s in (5, 6, 12)] == [
        Phase(6, 1.0, 0.05), Phase(10, COOLDOWN_FACTOR, 0.05), Phase(10, COOLDOWN_FACTOR, 0.05)
    ]  # fmt: skip
    for hint, phases in DEMO_PHASES.items():
        ends = [p.until for p in phases]
        assert ends == sorted(set(ends))
        assert all(0 <= p.empty_captions <= 1 and 0 < p.lr_factor <= 1 for p in phases)
        assert phases[-1].empty_captions < PLAIN.empty_captions or hint == "canny"  # binding phases end the recipe
    for hint, start in DEMO_STARTS.items():
        assert HINTS.index(start) < HINTS.index(hint)  # `train all` trains the start first


def test_train_all_on_the_demo_preset_follows_the_recipe(monkeypatch, tmp_path):
    """`python -m cldm train all`: the demo preset hands train_all the recipe's step counts, phases and starts (a
    step option overrides its count); the tiny preset none of the phases or starts."""
    from cldm.__main__ import main
    from cldm.training import train as train_module

    calls = []
    monkeypatch.setattr(train_module, "train_all", lambda o, schedule, hints, phases, starts: calls.append(
        (schedule, hints, phases, starts)))  # fmt: skip
    main(["train", "all", "--run", str(tmp_path), "--controlnet-steps", "900"])
    main(["train", "all", "--run", str(tmp_path), "--preset", "tiny", "--hint", "canny"])
    (schedule, hints, phases, starts), tiny_call = calls
    assert schedule == {**DEMO_SCHEDULE, "controlnet": 900} and hints == HINTS
    assert phases is DEMO_PHASES and starts is DEMO_STARTS
    assert tiny_call[1:] == (("canny",), None, None)


@pytest.mark.integration  # a training run
def test_base_loss_goes_down(tmp_path):
    """Thirty steps on one repeated small pool: the eps loss must fall well below its start."""
    torch.manual_seed(0)
    o = TrainOptions(
        run=tmp_path, preset="tiny", steps=6, batch=8, warmup=1, pool=8, ckpt_every=100, eval_every=100,
        eval_samples=1, sample_steps=1,
    )  # fmt: skip
    train_vae(o)
    from dataclasses import replace

    train_base(replace(o, steps=30, lr=1e-3, eval_every=1000))
    losses = [e["loss"] for e in _log(tmp_path / "base")]
    assert np.mean(losses[-8:]) < 0.8 * np.mean(losses[:4])


@pytest.mark.integration  # a training run
def test_demo_ip_adapter_trains_and_is_found_where_the_app_looks(tmp_path):
    """A few steps of `train ip-adapter` on the shipped demo model: the files come out in the published layouts,
    load like any SD1.5 adapter, and the app's lookup finds them beside the model."""
    from cldm.adapters.ip_adapter import load_ip_adapter
    from cldm.io import locate
    from cldm.io.image_encoder import load_image_encoder
    from cldm.pipeline.request import ImagePrompt
    from cldm.training.ip_train import train_ip_adapter

    demo = Path(__file__).parents[1] / "assets" / "demo"
    adapter_path, encoder_dir = train_ip_adapter(demo, tmp_path, steps=2, batch=4, pool=8)
    assert locate.locate_ip_adapter("ip-adapter_sd15", tmp_path) == adapter_path
    assert locate.locate_image_encoder(tmp_path) == encoder_dir
    keys = files.read_file(adapter_path)
    assert "image_proj.proj.weight" in keys and "ip_adapter.1.to_k_ip.weight" in keys
    sd = checkpoints.load_sd(demo / "shapes_sd.safetensors")
    prompt = ImagePrompt(load_ip_adapter(adapter_path), (make_sample(1, 64).image,), load_image_encoder(encoder_dir))
    out = generate(sd, GenerationRequest("", steps=2, width=64, height=64, image_prompt=prompt))
    assert out.images.shape == (1, 64, 64, 3)


def test_inpaint_and_shuffle_controlnets_train_on_their_own_hints(trained):
    """Inpaint trains on float hints (-1 in the hole), shuffle with its residuals averaged over the picture, written
    into its file so the app applies the same pooling."""
    from dataclasses import replace

    o = replace(trained, steps=2, eval_every=2)
    for hint in ("inpaint", "shuffle"):
        cn = checkpoints.load_controlnet(train_controlnet(o, hint))
        assert cn.cfg.global_average_pooling == (hint == "shuffle")
        assert all(np.isfinite(e["loss"]) for e in _log(trained.run / f"controlnet_{hint}"))
