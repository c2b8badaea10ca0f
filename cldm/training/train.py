"""Training the small shapes model family from scratch: VAE, then text encoder + UNet, then one ControlNet per hint.

    run/vae/vae.safetensors                 AutoencoderKL (config, with its fitted latent scale, in the metadata)
    run/base/sd.safetensors                 original-format SD single file (writers.save_sd)
    run/controlnet_<hint>/controlnet.safetensors   ControlNet 1.1-style file (writers.save_controlnet)
Every stage folder also has log.jsonl, optimizer.pt, samples/ and curves.png (see trainer.py); a stage that finds
its checkpoint resumes from it. `export()` writes the fp16 files the app ships (loading casts them back).
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, fields, replace
from pathlib import Path

import torch

from cldm.errors import InputError
from cldm.io import checkpoints, files, writers
from cldm.io.assemble import build
from cldm.io.model_configs import CONFIG_METADATA_KEY
from cldm.models.config import SDConfig, TextConfig, UNetConfig, VAEConfig
from cldm.models.controlnet import ControlNet
from cldm.models.sd import StableDiffusion, random_sd
from cldm.models.vae import AutoencoderKL
from cldm.pipeline.prompts import token_chunks
from cldm.sampling.schedules import TRAIN_STEPS, alphas_cumprod
from cldm.training.evaluation import ControlEval, sample_base, vae_eval
from cldm.training.latent_pool import LatentPool, images_to_tensor
from cldm.training.recipe import Phase, phase_at
from cldm.training.shapes import HINTS, make_batch
from cldm.training.trainer import GRAD_CLIP, Run, lr_at, make_optimizer, run_loop, step_generator
from cldm.training.vocab import MAX_LENGTH, shapes_tokenizer, vocab_size

log = logging.getLogger(__name__)

VAE_FILE, SD_FILE, CONTROLNET_FILE = "vae.safetensors", "sd.safetensors", "controlnet.safetensors"
POOLED_HINTS = ("shuffle",)
EVAL_OFFSET = 1_000_000_000  # evaluation pictures come from far past any training index
SCALE_SAMPLES = 64  # pictures used to fit the latent scale (1 / std of the latents, what 0.18215 is for SD)
KL_WEIGHT = 1e-5  # per latent element; just enough to keep the posterior from collapsing to a point
EMPTY_CAPTION_P_BASE = 0.1  # CFG needs "" seen (a ControlNet's share is its Phase's, recipe.py)
DEFAULT_LR = {"vae": 1e-3, "base": 5e-4, "controlnet": 1e-3}
DEFAULT_WARMUP = {"vae": 100, "base": 100, "controlnet": 50}
DEFAULT_BATCH = {"vae": 32, "base": 64, "controlnet": 16}  # a 2-core CPU does ~2x the pictures/s at 64 than at 16
# ControlNets keep a constant learning rate after the warm-up, as the paper does: a decaying one stalled them
# before their zero convolutions had opened up.
LR_DECAY = {"vae": True, "base": True, "controlnet": False}
# Min-SNR loss weighting (Hang et al. 2023, "Efficient Diffusion Training via Min-SNR Weighting Strategy"): with
# eps-prediction each timestep's loss is weighted min(SNR, gamma) / SNR, so the nearly noise-free steps, which teach
# little about layout and colour, stop dominating; the paper reports ~3x faster convergence with gamma = 5.
MIN_SNR_GAMMA = 5.0
ALPHAS_CUMPROD = alphas_cumprod()  # the SD1.5 schedule, once (every training step indexes it)
# Trained modules run channels-last: oneDNN's convolutions (more than half of a step) are faster that way on this CPU
# (measured per step: VAE 0.61 -> 0.51 s, base 1.55 -> 1.43 s, ControlNet 0.53 -> 0.51 s).


@dataclass(frozen=True)
class Family:
    """Picture size and the three configs of one model family."""

    size: int
    vae: VAEConfig
    text: TextConfig
    unet: UNetConfig


def _text_config(hidden: int, layers: int, heads: int) -> TextConfig:
    tok = shapes_tokenizer()
    return TextConfig(
        vocab_size=vocab_size(),
        hidden_size=hidden,
        intermediate_size=4 * hidden,
        num_layers=layers,
        num_heads=heads,
        max_length=MAX_LENGTH,
        bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    )


def family(preset: str) -> Family:
    """'demo': the shipped 64 px family; 'tiny': 32 px, for tests. The hint block downsamples as much as the VAE."""
    if preset == "demo":
        return Family(
            size=64,
            vae=VAEConfig(base_channels=32, channel_mult=(1, 2, 2), num_res_blocks=1, norm_groups=8),
            text=_text_config(hidden=128, layers=4, heads=4),
            unet=UNetConfig(
                model_channels=64, channel_mult=(1, 2, 2), num_res_blocks=1, attention_levels=(1, 2), num_heads=4,
                context_dim=128, norm_groups=16, hint_block_channels=(16, 32, 64),
            ),
        )  # fmt: skip
    if preset == "tiny":
        return Family(
            size=32,
            vae=VAEConfig(base_channels=16, channel_mult=(1, 2), num_res_blocks=1, norm_groups=8),
            text=_text_config(hidden=32, layers=2, heads=2),
            unet=UNetConfig(
                model_channels=32, channel_mult=(1, 2), num_res_blocks=1, attention_levels=(1,), num_heads=2,
                context_dim=32, norm_groups=8, hint_block_channels=(16, 32),
            ),
        )  # fmt: skip
    raise ValueError(f"unknown preset {preset!r}; choose demo or tiny")


@dataclass
class TrainOptions:
    """What one stage needs; the CLI fills it."""

    run: Path
    preset: str = "demo"
    steps: int = 1000
    batch: int | None = None  # None: the stage's DEFAULT_BATCH
    lr: float | None = None  # None: the stage's DEFAULT_LR
    warmup: int | None = None  # None: the stage's DEFAULT_WARMUP
    seed: int = 0
    pool: int = 16384  # distinct training pictures for the latent stages
    vae_crop: int | None = None  # train the VAE on random crops this large (it is convolutional): faster steps
    ckpt_every: int = 200
    eval_every: int = 200
    eval_samples: int = 8
    sample_steps: int = 20
    cfg_scale: float = 5.0
    fresh: bool = False  # ignore an existing checkpoint and start over
    phases: tuple[Phase, ...] = ()  # a ControlNet's learning rate and empty captions by step (none: PLAIN throughout)
    init: Path | None = None  # a ControlNet to start from (none: a copy of the base's encoder)


def _lr_batch(o: TrainOptions, stage: str) -> tuple[float, int]:
    """The stage's peak learning rate and batch: the options' own, else the stage's defaults."""
    return o.lr or DEFAULT_LR[stage], o.batch or DEFAULT_BATCH[stage]


def _lr(o: TrainOptions, stage: str, step: int, peak: float) -> float:
    warmup = DEFAULT_WARMUP[stage] if o.warmup is None else o.warmup
    return lr_at(step, peak, warmup, o.steps, decay=LR_DECAY[stage])


def _optimizer_step(opt: torch.optim.Optimizer, loss: torch.Tensor, params, lr: float) -> None:
    for group in opt.param_groups:
        group["lr"] = lr
    opt.zero_grad(set_to_none=True)
    loss.backward()
    torch.nn.utils.clip_grad_norm_(params, GRAD_CLIP)
    opt.step()


def _resuming(o: TrainOptions, run: Run, weights: Path) -> bool:
    if o.fresh:
        for name in ("log.jsonl", "optimizer.pt"):
            (run.folder / name).unlink(missing_ok=True)
        return False
    return run.has_checkpoint() and weights.is_file()


def _start(run: Run, opt: torch.optim.Optimizer, resume: bool) -> int:
    start = run.load_optimizer(opt) if resume else 0
    run.truncate_log(start)
    if start:
        log.info("%s: resuming at step %d", run.folder, start)
    return start


# ------------------------------------------------------------------------------------------------------ VAE
def load_vae(path: str | os.PathLike, dtype: torch.dtype = torch.float32) -> AutoencoderKL:
    """A VAE written by the VAE stage (its config, latent scale included, is in the file's metadata)."""
    data = json.loads(files.read_metadata(Path(path))[CONFIG_METADATA_KEY])["vae"]
    cfg = VAEConfig(**{f.name: tuple(v) if isinstance(v := data[f.name], list) else v for f in fields(VAEConfig)})
    return build(AutoencoderKL, cfg, files.read_file(path), "VAE", dtype)


@torch.no_grad()
def fit_latent_scale(vae: AutoencoderKL, size: int) -> float:
    """1 / std of the latent means over fixed pictures, so diffusion sees latents of unit variance."""
    x = images_to_tensor([s.image for s in make_batch(range(EVAL_OFFSET, EVAL_OFFSET + SCALE_SAMPLES), size, False)])
    mean, _ = vae.moments(x * 2 - 1)
    return float(1.0 / mean.std())


def _vae_loss(vae: AutoencoderKL, x: torch.Tensor, g: torch.Generator) -> tuple[torch.Tensor, dict[str, float]]:
    mean, std = vae.moments(x)
    z = mean + std * torch.randn(mean.shape, generator=g)
    rec = vae.decoder(vae.post_quant_conv(z))
    # L1 keeps flat colours and sharp edges; L2 adds weight to the few large errors along the edges.
    l1, l2 = (rec - x).abs().mean(), (rec - x).pow(2).mean()
    kl = 0.5 * (mean.pow(2) + std.pow(2) - 1 - 2 * std.clamp_min(1e-12).log()).mean()
    return l1 + l2 + KL_WEIGHT * kl, {"l1": l1.item(), "l2": l2.item(), "kl": kl.item()}


def train_vae(o: TrainOptions) -> Path:
    """Stage 1: the autoencoder on an endless stream of pictures; returns the weights file."""
    fam, run = family(o.preset), Run(o.run / "vae")
    path = run.folder / VAE_FILE
    resume = _resuming(o, run, path)
    torch.manual_seed(o.seed)
    vae = load_vae(path) if resume else AutoencoderKL(fam.vae)
    vae.requires_grad_(True).train().to(memory_format=torch.channels_last)
    lr, batch = _lr_batch(o, "vae")
    opt = make_optimizer(vae.parameters(), lr)
    start = _start(run, opt, resume)
    crop = o.vae_crop or fam.size

    def train_step(step: int) -> dict[str, float]:
        g = step_generator(o.seed, step)
        pictures = make_batch(range(step * batch, (step + 1) * batch), fam.size, hints=False)
        x = images_to_tensor([s.image for s in pictures])
        if crop < fam.size:
            top, left = (int(v) for v in torch.randint(0, fam.size - crop + 1, (2,), generator=g))
            x = x[:, :, top : top + crop, left : left + crop]
        loss, parts = _vae_loss(vae, x * 2 - 1, g)
        cur = _lr(o, "vae", step, lr)
        _optimizer_step(opt, loss, vae.parameters(), cur)
        return {"loss": loss.item(), **parts, "lr": cur}

    def save(step: int) -> None:
        vae.cfg = replace(vae.cfg, scale_factor=fit_latent_scale(vae.eval(), fam.size))
        vae.train()
        writers.save_file(vae.state_dict(), path, {"vae": vae.cfg})
        run.save_optimizer(opt, step)

    def evaluate(step: int) -> dict[str, float]:
        return vae_eval(vae, fam.size, range(EVAL_OFFSET, EVAL_OFFSET + o.eval_samples), run.samples, step)

    run_loop(run, start, o.steps, train_step, save, evaluate, o.ckpt_every, o.eval_every, "vae", ("psnr",))
    return path


# ------------------------------------------------------------------------------------- latent diffusion
def _noisy(
    mean: torch.Tensor, std: torch.Tensor, g: torch.Generator, cubic: bool = False
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(x_t, t, eps): a posterior sample of the latent, noised with the SD1.5 schedule.

    Timesteps are uniform, or with `cubic` t = (1 - u^3) * T: the T2I-Adapter paper's sampling, which puts most
    steps at high noise, where the layout (what a hint carries) is decided.
    """
    z0 = mean + std * torch.randn(mean.shape, generator=g)
    u = torch.rand(mean.shape[0], generator=g)
    t = ((1 - u**3) if cubic else u).mul(TRAIN_STEPS).long().clamp_(0, TRAIN_STEPS - 1)
    eps = torch.randn(mean.shape, generator=g)
    a = ALPHAS_CUMPROD[t][:, None, None, None]
    return a.sqrt() * z0 + (1 - a).sqrt() * eps, t, eps


def eps_loss(pred: torch.Tensor, eps: torch.Tensor, t: torch.Tensor, gamma: float | None = MIN_SNR_GAMMA):
    """Mean squared eps error, each picture weighted min(SNR_t, gamma) / SNR_t (plain MSE when gamma is None)."""
    per_picture = (pred.float() - eps).pow(2).mean(dim=(1, 2, 3))
    if gamma is None:
        return per_picture.mean()
    a = ALPHAS_CUMPROD[t]
    snr = a / (1 - a)
    return (per_picture * snr.clamp(max=gamma) / snr).mean()


def _drop_captions(captions: list[str], p: float, g: torch.Generator) -> list[str]:
    keep = torch.rand(len(captions), generator=g) >= p
    return [c if k else "" for c, k in zip(captions, keep.tolist())]


def _batch_indices(batch: int, pool: LatentPool, g: torch.Generator) -> list[int]:
    return torch.randint(0, len(pool), (batch,), generator=g).tolist()


def train_base(o: TrainOptions) -> Path:
    """Stage 2: text encoder + UNet on eps-prediction in the frozen VAE's latent space."""
    fam, run = family(o.preset), Run(o.run / "base")
    path = run.folder / SD_FILE
    resume = _resuming(o, run, path)
    tok = shapes_tokenizer()
    if resume:
        model = checkpoints.load_sd(path, tokenizer=tok)
    else:
        vae = load_vae(o.run / "vae" / VAE_FILE)
        model = random_sd(SDConfig(fam.unet, vae.cfg, fam.text), tok, seed=o.seed)
        model.vae = vae
    model.vae.requires_grad_(False).eval()
    for m in (model.unet, model.text):
        m.requires_grad_(True).train()
    model.unet.to(memory_format=torch.channels_last)
    params = [*model.unet.parameters(), *model.text.parameters()]
    lr, batch = _lr_batch(o, "base")
    opt = make_optimizer(params, lr)
    start = _start(run, opt, resume)
    pool = LatentPool(model.vae, fam.size, o.pool)

    def train_step(step: int) -> dict[str, float]:
        g = step_generator(o.seed, step)
        mean, std, captions, _ = pool.get(_batch_indices(batch, pool, g))
        x_t, t, eps = _noisy(mean, std, g)
        ids = token_chunks(model.text, _drop_captions(captions, EMPTY_CAPTION_P_BASE, g))[:, 0]
        loss = eps_loss(model.unet(x_t, t, model.text(ids)), eps, t)
        cur = _lr(o, "base", step, lr)
        _optimizer_step(opt, loss, params, cur)
        return {"loss": loss.item(), "lr": cur}

    def save(step: int) -> None:
        writers.save_sd(model, path)
        run.save_optimizer(opt, step)

    def evaluate(step: int) -> dict[str, float]:
        seeds = range(EVAL_OFFSET, EVAL_OFFSET + o.eval_samples)
        return sample_base(model, fam.size, seeds, run.samples, step, o.sample_steps, o.cfg_scale)

    run_loop(run, start, o.steps, train_step, save, evaluate, o.ckpt_every, o.eval_every, "base")
    return path


def controlnet_pool(o: TrainOptions, hints=HINTS) -> LatentPool:
    """The training pictures of the ControlNet stages with their `hints`, for one encode shared by all of them."""
    return LatentPool(load_vae(o.run / "vae" / VAE_FILE), family(o.preset).size, o.pool, hints=hints)


def train_controlnet(o: TrainOptions, hint: str, pool: LatentPool | None = None) -> Path:
    """Stage 3: one ControlNet copied from the frozen base UNet (zero convs at zero), as the ControlNet paper.

    `pool` (from `controlnet_pool`) lets several ControlNets share the encoded pictures; by default the stage makes
    its own."""
    if hint not in HINTS:
        raise ValueError(f"unknown hint {hint!r}; choose one of {', '.join(HINTS)}")
    fam, run = family(o.preset), Run(o.run / f"controlnet_{hint}")
    path = run.folder / CONTROLNET_FILE
    resume = _resuming(o, run, path)
    base: StableDiffusion = checkpoints.load_sd(o.run / "base" / SD_FILE, tokenizer=shapes_tokenizer()).freeze()
    torch.manual_seed(o.seed)
    # Shuffle carries the picture's colours and style, not its layout: its residuals are averaged over the picture
    # (ControlNet 1.1's global average pooling), in training as in use.
    cfg = replace(base.config.unet, global_average_pooling=hint in POOLED_HINTS)
    if resume:
        cn = checkpoints.load_controlnet(path)
    elif o.init:  # another hint's ControlNet: what it learnt of the words is kept, its hint encoder learns anew
        cn = checkpoints.load_controlnet(o.init)
        if cn.cfg != cfg:
            raise InputError(
                f"{o.init} is not a ControlNet of this base for the {hint} hint (another base, or pooled: shuffle)"
            )
    else:
        cn = ControlNet.from_unet(base.unet, cfg)
    cn.requires_grad_(True).train().to(memory_format=torch.channels_last)
    base.unet.to(memory_format=torch.channels_last)
    lr, batch = _lr_batch(o, "controlnet")
    opt = make_optimizer(cn.parameters(), lr)
    start = _start(run, opt, resume)
    if pool is None:
        pool = LatentPool(base.vae, fam.size, o.pool, hints=(hint,))
    control_eval = ControlEval(
        base, hint, fam.size, range(EVAL_OFFSET, EVAL_OFFSET + o.eval_samples), o.sample_steps, o.cfg_scale
    )

    def train_step(step: int) -> dict[str, float]:
        g = step_generator(o.seed, step)
        mean, std, captions, hints = pool.get(_batch_indices(batch, pool, g), hint)
        x_t, t, eps = _noisy(mean, std, g, cubic=True)
        phase = phase_at(o.phases, step)
        with torch.no_grad():
            ctx = base.text(token_chunks(base.text, _drop_captions(captions, phase.empty_captions, g))[:, 0])
        control = cn(x_t, t, ctx, cn.embed_hint(hints))
        loss = eps_loss(base.unet(x_t, t, ctx, control=control), eps, t)
        cur = _lr(o, "controlnet", step, lr) * phase.lr_factor
        _optimizer_step(opt, loss, cn.parameters(), cur)
        return {"loss": loss.item(), "lr": cur}

    def save(step: int) -> None:
        writers.save_controlnet(cn, path)
        run.save_optimizer(opt, step)

    def evaluate(step: int) -> dict[str, float]:
        return control_eval(cn, run.samples, step)

    metrics = ("f1_on", "f1_off")
    run_loop(run, start, o.steps, train_step, save, evaluate, o.ckpt_every, o.eval_every, f"cn-{hint}", metrics)
    return path


def train_all(
    o: TrainOptions,
    schedule: dict[str, int],
    hints=HINTS,
    phases: dict[str, tuple[Phase, ...]] | None = None,
    starts: dict[str, str] | None = None,
) -> None:
    """Every stage in order with its step count from `schedule` (`controlnet_<hint>` overrides `controlnet` for one
    hint), each ControlNet's phases from `phases` and, for a hint in `starts`, the ControlNet of the hint named there
    (trained before it) as its start; each stage resumes if it was interrupted."""
    hints = tuple(hints)
    inits = {h: o.run / f"controlnet_{start}" / CONTROLNET_FILE for h, start in (starts or {}).items() if h in hints}
    for hint, init in inits.items():  # checked before hours of training, not after them
        if starts[hint] not in hints[: hints.index(hint)] and not init.is_file():
            raise InputError(f"the {hint} ControlNet starts from the {starts[hint]} one: train that first ({init})")
    train_vae(replace(o, steps=schedule["vae"]))
    train_base(replace(o, steps=schedule["base"]))
    pool = controlnet_pool(o, hints)  # the same pictures for every ControlNet: encoded once, not once per hint
    for hint in hints:
        steps = schedule.get(f"controlnet_{hint}") or schedule["controlnet"]
        o_hint = replace(o, steps=steps, phases=(phases or {}).get(hint, ()), init=inits.get(hint))
        train_controlnet(o_hint, hint, pool)
