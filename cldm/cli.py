"""The inference commands of `python -m cldm`: generate and convert."""

from __future__ import annotations

import argparse
import sys
from dataclasses import replace
from pathlib import Path
from typing import TypeVar

from tqdm import tqdm

import annotators
from cldm.adapters import few_step
from cldm.adapters.lora import prompt_tags
from cldm.errors import InputError, MissingWeightsError
from cldm.hints.conditions import PREPROCESSOR_NONE
from cldm.hints.fitted import fitted_hint, pixel_perfect
from cldm.io import checkpoints, files, identify, locate, writers
from cldm.io.images import load_rgb, save_png
from cldm.io.model_card import ModelCard, card_for
from cldm.models.family import SD15
from cldm.pipeline.guidance_options import add_guidance_args, guidance_from_args
from cldm.pipeline.request import (
    ControlUnit,
    GenerationRequest,
    HiresFix,
    ImagePrompt,
    LoraUnit,
    ReferenceUnit,
)
from cldm.pipeline.union import ControlType
from cldm.pipeline.vocabulary import ControlMode, InpaintMode, ResizeMode, Upscaler
from cldm.runtime.manager import ModelManager
from cldm.sampling.samplers import SAMPLERS

DEFAULT_SIZE = SD15.native_size  # for a base without a model card
T = TypeVar("T")


def add_generate_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--base", required=True, help="SD1.5 single file (.safetensors/.ckpt) or diffusers pipeline folder")
    p.add_argument("--controlnet", action="append", default=[], help="ControlNet file or folder (repeatable)")
    p.add_argument("--hint", action="append", default=[],
                   help="picture for each --controlnet: the hint itself, or what its --preprocessor reads")  # fmt: skip
    p.add_argument("--preprocessor", action="append", default=[], metavar="NAME",
                   help="per ControlNet (once: for all): the app's preprocessor that makes the hint from --hint "
                   "(canny, scribble_sketch, depth_midas, ...; default none: the picture is the hint)")  # fmt: skip
    p.add_argument("--control-type", action="append", default=[], metavar="TYPE",
                   help="per ControlNet Union (once: for all): its control type, one of "
                   f"{', '.join(ControlType.keys())} (tile, repaint: ProMax only); default: the one --preprocessor "
                   "names (canny, lineart, mlsd: canny; softedge, scribble: softedge; depth_*: depth ...)")  # fmt: skip
    p.add_argument("--controlnet-mask", action="append", default=[], metavar="FILE",
                   help="per ControlNet (once: for all): its effective region, a picture white where it acts and "
                   "black where it does not (stretched to the picture); none: everywhere (the default)")  # fmt: skip
    p.add_argument("--processor-res", action="append", type=int, default=[], metavar="PX",
                   help="per ControlNet: the preprocessor's resolution (default: pixel perfect, from the picture "
                   "and the output size)")  # fmt: skip
    p.add_argument("--models-dir", default="models",
                   help="where the preprocessors' weights are: DIR/annotators/ (else the Hugging Face cache)")  # fmt: skip
    p.add_argument("--control-scale", action="append", type=float, default=[], help="strength per ControlNet (1.0)")
    p.add_argument("--control-start", action="append", type=float, default=[], help="start fraction per ControlNet (0)")
    p.add_argument("--control-end", action="append", type=float, default=[], help="end fraction per ControlNet (1)")
    p.add_argument("--control-mode", action="append", default=[], choices=ControlMode.keys(),
                   help="per ControlNet: balanced; prompt (My prompt is more important); control (ControlNet is more "
                   "important)")  # fmt: skip
    p.add_argument("--resize-mode", action="append", default=[], choices=ResizeMode.keys(),
                   help="per ControlNet (the first also for --init-image/--mask): just (stretch), crop (default: cover, "
                   "cut the centre), fill (fit inside, pad; with --mask the border is outpainted)")  # fmt: skip
    p.add_argument("--guess-mode", action="store_true", help="ControlNet on the conditional half only, decaying scales")
    p.add_argument("--prompt", required=True)
    p.add_argument("--negative-prompt", default="")
    p.add_argument("--lora", action="append", default=[], metavar="FILE[:WEIGHT]",
                   help="a LoRA file and its weight (1 if not given); repeatable")  # fmt: skip
    p.add_argument(
        "--lora-dir",
        default="models",
        help="where <lora:name:weight> tags in --prompt are found (DIR/loras/name.safetensors)",
    )
    p.add_argument(
        "--vae",
        help="another VAE file or folder (e.g. vae-ft-mse-840000-ema-pruned.safetensors), or a "
        "TAESD for fast decoding (taesd_decoder.pth with its encoder beside it, or an AutoencoderTiny folder)",
    )
    p.add_argument(
        "--embeddings",
        metavar="DIR",
        help="a folder of textual-inversion files (.pt/.safetensors), used by file name in the prompts",
    )
    p.add_argument("--no-emphasis", action="store_true",
                   help="take the prompts literally (no A1111 (word:1.2) / [word] / BREAK syntax), as diffusers does")  # fmt: skip
    few = " (default %s; a few-step LoRA's card's when one is given: LCM, TCD, Hyper-SD, Lightning)"
    p.add_argument("--steps", type=int, default=None, help="sampling steps" + few % 20)
    p.add_argument("--cfg", type=float, default=None, help="classifier-free guidance scale" + few % 7.5)
    add_guidance_args(p)  # --cfg-rescale, --freeu, --pag-scale, --pag-layers
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--sampler", choices=sorted(SAMPLERS), default=None, help="sampler" + few % "ddim")
    p.add_argument("--eta", type=float, default=None, help="DDIM eta (0 = deterministic); TCD's gamma" + few % 0)
    p.add_argument("--clip-skip", type=int, default=1, help="1 = last CLIP layer; 2 = penultimate (anime models)")
    size_help = "picture {} in px (default: the model card's size, else the base's native size: 512 SD1.5, 1024 SDXL)"
    p.add_argument("--width", type=int, help=size_help.format("width"))
    p.add_argument("--height", type=int, help=size_help.format("height"))
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--init-image", help="img2img / inpaint source picture")
    p.add_argument("--strength", type=float, default=1.0, help="denoising strength with --init-image")
    p.add_argument("--mask", help="inpaint mask: white = repaint")
    p.add_argument("--mask-blur", type=float, default=0.0, help="inpaint mask edge blur, Gaussian sigma in px (0)")
    p.add_argument("--inpaint-mode", choices=InpaintMode.keys(), default=InpaintMode.ONLY.key,
                   help="only: keep the unmasked pixels exactly; global: redraw the whole picture")  # fmt: skip
    p.add_argument("--hires-scale", type=float, help="hires fix: upscale by this factor, then denoise again")
    p.add_argument("--hires-steps", type=int, default=0, help="hires pass steps (0: as many as --steps)")
    p.add_argument("--hires-strength", type=float, default=0.7, help="hires pass denoising strength")
    p.add_argument("--hires-upscaler", choices=Upscaler.keys(), default=Upscaler.LATENT.key)
    p.add_argument("--seed-per-picture", action="store_true",
                   help="a batch's picture i gets seed + i (A1111; each reproducible alone)")  # fmt: skip
    add_image_prompt_args(p)  # --ip-adapter FILE --ip-image PIC [--ip-scale S] [--ip-mask M], per IP-Adapter
    p.add_argument("--reference", help="reference-only: a picture whose style/content the UNet attends to")
    p.add_argument("--reference-mode", choices=["only", "adain", "adain+attn"], default="only")
    p.add_argument("--style-fidelity", type=float, default=0.5, help="0..1: how much the reference wins over CFG")
    p.add_argument("--reference-weight", type=float, default=1.0, help="which UNet blocks take part (A1111 weight)")
    p.add_argument("--device", default="auto", help="auto, cpu, cuda, cuda:1, mps")
    p.add_argument("--dtype", default="auto", help="auto, fp32, fp16, bf16")
    p.add_argument("--low-vram", action="store_true",
                   help="keep only the running module on the GPU (slower; for 4-6 GB cards)")  # fmt: skip
    p.add_argument("--no-prepack", action="store_true",
                   help="bf16 on the CPU without the prepacked convolutions (less memory, slower steps)")  # fmt: skip
    p.add_argument("--out", default="out.png", help="output PNG (a batch writes out-0.png, out-1.png, ...)")


# ------------------------------------------------------------------------------------------- image prompts
# `--ip-adapter FILE` opens a group; the `--ip-image`, `--ip-scale`, `--ip-mask` and `--image-encoder` after it
# belong to it (those before the first `--ip-adapter` to the first group). A group without its own `--image-encoder`
# takes the one of the group before it (the first group: the first one given).
GROUP_FIELDS = {"--ip-adapter": "adapter", "--image-encoder": "encoder", "--ip-scale": "scale", "--ip-mask": "mask"}


class _GroupOption(argparse.Action):
    """Puts an option's value into the image-prompt group it belongs to (`ns.ip_groups`, a list of dicts)."""

    def __call__(self, parser, ns, value, option_string=None):
        groups = getattr(ns, self.dest) or []
        setattr(ns, self.dest, groups)
        opens = option_string == "--ip-adapter" and (not groups or groups[-1]["adapter"] is not None)
        if opens or not groups:
            groups.append({"adapter": None, "encoder": None, "scale": None, "mask": None, "images": []})
        group = groups[-1]
        if option_string == "--ip-image":
            group["images"].append(value)
            return
        field = GROUP_FIELDS[option_string]
        if group[field] is not None:
            raise argparse.ArgumentError(self, f"given twice for IP-Adapter {len(groups)}: give one per --ip-adapter")
        group[field] = value


def add_image_prompt_args(p: argparse.ArgumentParser) -> None:
    """The options, repeatable as groups: --ip-adapter FILE --ip-image PIC [--ip-image PIC] [--ip-scale S]
    [--ip-mask M] [--image-encoder DIR], once per IP-Adapter."""
    kw = dict(dest="ip_groups", action=_GroupOption, default=None)
    p.add_argument("--ip-adapter", **kw, metavar="FILE",
                   help="IP-Adapter file (ip-adapter_sd15.bin/.safetensors, ip-adapter-plus_sd15, "
                   "ip-adapter_sdxl, ip-adapter-plus_sdxl_vit-h, ...); repeat for several, each with its "
                   "--ip-* options after it")  # fmt: skip
    p.add_argument("--image-encoder", **kw, metavar="DIR",
                   help="its CLIP image-encoder folder (models/image_encoder of h94/IP-Adapter: ViT-H; "
                   "sdxl_models/image_encoder: bigG, for ip-adapter_sdxl); later adapters take the one "
                   "before")  # fmt: skip
    p.add_argument("--ip-image", **kw, metavar="PIC",
                   help="image prompt of the --ip-adapter before it (repeatable: features averaged)")  # fmt: skip
    p.add_argument(
        "--ip-scale", **kw, type=float, metavar="S", help="its strength (A1111's weight; default 1; 0 = off)"
    )
    p.add_argument("--ip-mask", **kw, metavar="PIC",
                   help="its region: a picture, white where it acts (resized to the output size)")  # fmt: skip


def image_prompts_from_args(a: argparse.Namespace) -> tuple[ImagePrompt, ...]:
    """Each option group as an ImagePrompt (pictures and masks read), in the order given."""
    groups = a.ip_groups or []
    encoders = [g["encoder"] for g in groups if g["encoder"] is not None]
    encoder = encoders[0] if encoders else None
    out = []
    for i, g in enumerate(groups):
        encoder = g["encoder"] or encoder
        if g["adapter"] is None and not g["images"] and g["mask"] is None:
            continue  # an encoder or a scale alone asks for no image prompt
        if g["adapter"] is None or not g["images"] or encoder is None:
            which = f"image prompt {i + 1}" + (f" ({g['adapter']})" if g["adapter"] else "")
            raise InputError(f"{which}: an image prompt needs --ip-adapter FILE, --image-encoder FOLDER and "
                             "--ip-image FILE (--ip-image, --ip-scale, --ip-mask after their --ip-adapter)")  # fmt: skip
        mask = None if g["mask"] is None else load_rgb(g["mask"])[..., 0]  # a grey picture: one channel
        scale = 1.0 if g["scale"] is None else g["scale"]
        out.append(ImagePrompt(g["adapter"], tuple(load_rgb(f) for f in g["images"]), encoder, scale, mask=mask))
    return tuple(out)


def _per_control(values: list[T], n: int, default: T, name: str) -> list[T]:
    if not values:
        return [default] * n
    if len(values) == 1:
        return values * n
    if len(values) != n:
        raise InputError(f"give {name} once, or once per --controlnet ({n}); got {len(values)}")
    return values


def native_size(base: str) -> int:
    """The picture side a base was trained at, from its family (SDXL 1024, SD2 768-v 768, SD1.5 and SD2-base 512),
    told from its weights without loading them; DEFAULT_SIZE for a hub id not downloaded yet."""
    return checkpoints.native_size(base) if Path(base).exists() else DEFAULT_SIZE


def request_from_args(a: argparse.Namespace, card: ModelCard | None = None) -> GenerationRequest:
    """The command line as a GenerationRequest (pictures read, sizes from the model card when not given)."""
    n = len(a.controlnet)
    if len(a.hint) != n:
        raise InputError(f"give one --hint per --controlnet (got {n} ControlNets and {len(a.hint)} hints)")
    scales = _per_control(a.control_scale, n, 1.0, "--control-scale")
    starts = _per_control(a.control_start, n, 0.0, "--control-start")
    ends = _per_control(a.control_end, n, 1.0, "--control-end")
    modes = [ControlMode.parse(m) for m in a.control_mode] or [ControlMode.BALANCED]
    modes = modes * n if len(modes) == 1 else modes
    if len(modes) != n and n:
        raise InputError(f"give --control-mode once, or once per --controlnet ({n}); got {len(a.control_mode)}")
    resizes = [ResizeMode.parse(m) for m in a.resize_mode] or [ResizeMode.CROP]
    init_resize = resizes[0]  # the first also fits --init-image and --mask
    resizes = resizes * n if len(resizes) == 1 else resizes
    if len(resizes) != n and n:
        raise InputError(f"give --resize-mode once, or once per --controlnet ({n}); got {len(a.resize_mode)}")
    preprocessors = _per_control(a.preprocessor, n, PREPROCESSOR_NONE, "--preprocessor")
    unknown = sorted(set(preprocessors) - set(annotators.ANNOTATORS))
    if unknown:
        raise InputError(f"unknown --preprocessor {', '.join(unknown)}; the preprocessors are: "
                         f"{', '.join(sorted(annotators.ANNOTATORS))}")  # fmt: skip
    resolutions = _per_control(a.processor_res, n, None, "--processor-res")
    types = [
        None if t is None else ControlType.parse(t) for t in _per_control(a.control_type, n, None, "--control-type")
    ]
    resolutions = [None if pre == PREPROCESSOR_NONE else res for pre, res in zip(preprocessors, resolutions)]
    masks = [None if m in (None, "none") else load_rgb(m)[..., 0]  # a grey picture: one channel
             for m in _per_control(a.controlnet_mask, n, None, "--controlnet-mask")]  # fmt: skip
    units = [
        ControlUnit(p, load_rgb(h), s, st, e, mode=m, resize_mode=rm, processor_res=res, control_type=ct, mask=mk,
                    preprocessor="" if pre == PREPROCESSOR_NONE else pre)  # "": the picture is the hint (`with_hints`)
        for p, h, s, st, e, m, rm, pre, res, ct, mk in
        zip(a.controlnet, a.hint, scales, starts, ends, modes, resizes, preprocessors, resolutions, types, masks)
    ]  # fmt: skip
    prompts = image_prompts_from_args(a)  # the first goes in as `image_prompt`, the others after it
    reference = None
    if a.reference:
        reference = ReferenceUnit(load_rgb(a.reference), a.reference_mode, a.style_fidelity, a.reference_weight)
    prompt, tags = prompt_tags(a.prompt)
    loras = [LoraUnit(str(locate.locate_lora(name, a.lora_dir)), w, te) for name, w, te in tags]
    for spec in a.lora:
        path, _, weight = spec.rpartition(":")
        try:
            loras.append(LoraUnit(path, float(weight)) if path else LoraUnit(spec))
        except ValueError:
            loras.append(LoraUnit(spec))  # a path with a colon in it, no weight
    native = card.size if card else native_size(a.base)
    width, height = (native if v is None else v for v in (a.width, a.height))
    steps, cfg, sampler, eta = sampling_settings(a, loras)
    return GenerationRequest(
        prompt, a.negative_prompt, tuple(units), steps=steps, cfg_scale=cfg, sampler=sampler, eta=eta,
        seed=a.seed, width=width, height=height, batch=a.batch, guess_mode=a.guess_mode,
        clip_skip=a.clip_skip, init_image=load_rgb(a.init_image) if a.init_image else None, strength=a.strength,
        mask=load_rgb(a.mask)[..., 0] if a.mask else None, image_prompt=prompts[0] if prompts else None,
        image_prompts=prompts[1:], reference=reference,
        resize_mode=init_resize, mask_blur=a.mask_blur, inpaint_mode=InpaintMode.parse(a.inpaint_mode),
        seed_per_picture=a.seed_per_picture, emphasis=not a.no_emphasis, loras=tuple(loras), vae=a.vae,
        hires=None if a.hires_scale is None else HiresFix(a.hires_scale, a.hires_steps, a.hires_strength,
                                                          Upscaler.parse(a.hires_upscaler)),
        **guidance_from_args(a),
    )  # fmt: skip


def sampling_settings(a: argparse.Namespace, loras: list[LoraUnit]) -> tuple[int, float, str, float]:
    """Steps, guidance, sampler and eta: the ones given, else a few-step LoRA's card's (said on stderr), else the
    defaults (20 steps of DDIM at guidance 7.5)."""
    given = {"steps": a.steps, "cfg": a.cfg, "sampler": a.sampler, "eta": a.eta}
    found = next(((u, p) for u in loras if (p := few_step.proposal_for(u.model)) is not None), None)
    if found is not None and None in given.values():
        unit, proposal = found
        taken = {"steps": proposal.steps, "cfg": proposal.cfg_scale, "sampler": proposal.sampler, "eta": proposal.eta}
        print(f"{proposal.text(Path(unit.model).name)}; using "
              + ", ".join(f"--{k} {taken[k]}" for k, v in given.items() if v is None)
              + " (give them to choose others)", file=sys.stderr)  # fmt: skip
        given = {k: taken[k] if v is None else v for k, v in given.items()}
    defaults = {"steps": 20, "cfg": 7.5, "sampler": "ddim", "eta": 0.0}
    return tuple(defaults[k] if v is None else v for k, v in given.items())  # type: ignore[return-value]


def with_hints(request: GenerationRequest, models_dir: str | None) -> GenerationRequest:
    """Each unit that names a preprocessor gets the hint it makes from the unit's picture, fitted to the picture
    size as the app fits it; the others keep their picture as the hint."""
    units = []
    for i, unit in enumerate(request.units):
        if unit.preprocessor:
            size = request.width, request.height
            res = unit.processor_res or pixel_perfect(unit.hint, *size, unit.resize_mode)
            try:
                hint = fitted_hint(unit.preprocessor, unit.hint, *size, unit.resize_mode, res, models_dir)
            except annotators.MissingAnnotatorWeights as e:
                raise MissingWeightsError(f"--preprocessor {unit.preprocessor}: {e}") from e
            except annotators.AnnotatorError as e:
                raise InputError(f"--preprocessor {unit.preprocessor} (ControlNet {i + 1}): {e}") from e
            unit = replace(unit, hint=hint, processor_res=res, pixel_perfect=not unit.processor_res)
        units.append(unit)
    return replace(request, units=tuple(units))


class StepBar:
    """`ModelManager.run`'s step callback as a tqdm bar on stderr; on no terminal, no bar (a log gets no frames)."""

    def __init__(self) -> None:
        self.bar: tqdm | None = None

    def __call__(self, done: int, total: int) -> None:
        if self.bar is None:  # the total (steps of both hires passes, or fewer for img2img) comes with the first step
            self.bar = tqdm(total=total, desc="generate", unit="step", file=sys.stderr, dynamic_ncols=True,
                            disable=None)  # fmt: skip
        self.bar.update(done - self.bar.n)

    def close(self) -> None:
        if self.bar is not None:
            self.bar.close()


def cmd_generate(a: argparse.Namespace) -> None:
    card = card_for(a.base)
    request = request_from_args(a, card).validate()  # before the base model is loaded
    request = with_hints(request, a.models_dir)  # before it too: a preprocessor's missing weights show at once
    if card and (a.width is None or a.height is None):
        print(f"{card.name} model: its native size is {card.size} px (model card); "
              f"making {request.width}x{request.height}", file=sys.stderr)  # fmt: skip
    elif a.width is None or a.height is None:
        print(f"making {request.width}x{request.height} (the base's native size)", file=sys.stderr)
    manager = ModelManager(a.base, device=a.device, dtype=a.dtype, low_vram=a.low_vram, prepack_cpu=not a.no_prepack)
    print(f"{manager.device} {str(manager.dtype).removeprefix('torch.')}", file=sys.stderr)  # what auto chose
    if a.embeddings:
        for name, why in manager.load_embeddings(a.embeddings).items():
            print(f"embedding {name} left out: {why}", file=sys.stderr)
    bar = StepBar()
    try:
        result = manager.run(request, callback=bar)
    finally:
        bar.close()
    out = Path(a.out)
    paths = [out] if a.batch == 1 else [out.with_name(f"{out.stem}-{i}{out.suffix}") for i in range(a.batch)]
    for i, (img, path) in enumerate(zip(result.images, paths)):
        save_png(img, path, result.text(i))
        print(path)
    t = result.timings
    print(f"swap {t['swap']:.2f}s, sampling {t['sampling']:.2f}s, decode {t['decode']:.2f}s", file=sys.stderr)


def add_convert_args(c: argparse.ArgumentParser) -> None:
    c.add_argument("src")
    c.add_argument("dst")
    c.add_argument("--to", choices=["original", "diffusers", "bare"], default="original")
    c.add_argument("--kind", choices=["auto", "sd", "controlnet"], default="auto")
    c.add_argument("--dtype", choices=["fp32", "fp16", "bf16"], default="fp32",
                   help="the written weights' type (fp16: half the size; SDXL's published files are fp16)")  # fmt: skip
    c.add_argument("--prediction", choices=["auto", "epsilon", "v"], default="auto",
                   help="what a base model's UNet predicts, over what the source says (e.g. an SD2 768-v file with no "
                   ".yaml beside it); auto: the source's word, else a probe of an SD2 UNet. Written into the output")  # fmt: skip


def cmd_convert(a: argparse.Namespace) -> None:
    """Any family (SD1.5, SD2.x, SDXL) and its ControlNets: single file <-> diffusers folder (writers.py)."""
    from cldm.runtime.devices import DTYPES

    src = Path(a.src)
    dtype = DTYPES[a.dtype]
    prediction = None if a.prediction == "auto" else a.prediction
    kind = a.kind
    if kind == "auto":
        if src.is_dir():
            kind = "sd" if (src / "model_index.json").is_file() else "controlnet"
        else:
            found = identify.weight_kind(files.read_file(src))
            kind = "sd" if found is identify.WeightKind.SD_BASE else "controlnet"
    if kind == "sd":
        if a.to == "bare":
            raise InputError("--to bare is for ControlNets; a base model converts to original or diffusers")
        sd = checkpoints.load_sd(src, dtype, prediction=prediction)
        writers.save_sd(sd, a.dst, fmt=a.to)
        kind = f"{sd.config.family} {kind}, {sd.config.prediction} prediction"
    else:
        writers.save_controlnet(checkpoints.load_controlnet(src, dtype), a.dst, fmt=a.to)
    print(f"wrote {a.dst} ({kind}, {a.to} format)")
