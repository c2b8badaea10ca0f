"""controlnet-aux detectors: which files each needs, how to build it, and how each registry name calls it.

Every function here has the signature `(image, resolution, models_dir, params) -> hint`, where `image` is already
checked HxWx3 uint8 RGB and the hint may come back at the detection size (the registry resizes it to the input).
controlnet-aux is imported lazily, inside the builders, so that importing the registry stays cheap.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import cv2
import numpy as np
import torch

from annotators.cache import cached_load, is_loaded
from annotators.weights import ANNOTATORS_REPO, WeightFile, resolve

ModelsDir = str | os.PathLike[str] | None
DetectFn = Callable[[np.ndarray, int, ModelsDir, Mapping[str, float]], np.ndarray]

# File names in lllyasviel/Annotators (the defaults of controlnet-aux 0.0.10's from_pretrained).
HED_FILE = WeightFile(ANNOTATORS_REPO, "ControlNetHED.pth")
PIDINET_FILE = WeightFile(ANNOTATORS_REPO, "table5_pidinet.pth")
MLSD_FILE = WeightFile(ANNOTATORS_REPO, "mlsd_large_512_fp32.pth")
MIDAS_FILE = WeightFile(ANNOTATORS_REPO, "dpt_hybrid-midas-501f0c75.pt")
ZOE_FILE = WeightFile(ANNOTATORS_REPO, "ZoeD_M12_N.pt")
LERES_FILE = WeightFile(ANNOTATORS_REPO, "res101.pth")
NORMAL_BAE_FILE = WeightFile(ANNOTATORS_REPO, "scannet.pt")
LINEART_FILE = WeightFile(ANNOTATORS_REPO, "sk_model.pth")
LINEART_COARSE_FILE = WeightFile(ANNOTATORS_REPO, "sk_model2.pth")
LINEART_ANIME_FILE = WeightFile(ANNOTATORS_REPO, "netG.pth")
OPENPOSE_BODY_FILE = WeightFile(ANNOTATORS_REPO, "body_pose_model.pth")
OPENPOSE_HAND_FILE = WeightFile(ANNOTATORS_REPO, "hand_pose_model.pth")
OPENPOSE_FACE_FILE = WeightFile(ANNOTATORS_REPO, "facenet.pth")


def _load_state(path: Path) -> dict[str, Any]:
    """Tensors only: a pickle that holds code is refused, never run."""
    return torch.load(path, map_location="cpu", weights_only=True)


def _strip_module(state: Mapping[str, Any]) -> dict[str, Any]:
    """Checkpoints saved from DataParallel prefix every key with 'module.'."""
    return {k.removeprefix("module."): v for k, v in state.items()}


def _sizes(resolution: int) -> dict[str, Any]:
    # controlnet-aux resizes to `detect_resolution` (short side, multiples of 64) to run and to `image_resolution`
    # for its output; the registry then brings the hint back to the input size.
    return {"detect_resolution": resolution, "image_resolution": resolution, "output_type": "np"}


# ---- builders (paths come from weights.resolve, in the order of the files tuple) ----


def _build_from_pretrained(cls_name: str) -> Any:
    """A builder that calls controlnet-aux's own from_pretrained with the resolved file.

    from_pretrained(folder, filename=...) joins folder and filename; an absolute filename wins that join, so one
    call works for files from the local folder and from the HF cache alike.
    """

    def build(paths: list[Path]) -> Any:
        import controlnet_aux

        path = paths[0]
        return getattr(controlnet_aux, cls_name).from_pretrained(str(path.parent), filename=str(path))

    return build


def _build_lineart(paths: list[Path]) -> Any:
    # LineartDetector.from_pretrained wants both the fine and the coarse file; each registry name needs only one,
    # so build the generator ourselves and use it in both slots.
    from controlnet_aux.lineart import Generator, LineartDetector

    model = Generator(3, 1, 3)
    model.load_state_dict(_load_state(paths[0]))
    model.eval()
    return LineartDetector(model, model)


def _build_leres(paths: list[Path]) -> Any:
    # Plain LeReS (not LeReS++ "boost") never touches the pix2pix refiner; from_pretrained would also need its
    # latest_net_G.pth and parses sys.argv for pix2pix options, so build only the depth network.
    from controlnet_aux.leres import LeresDetector
    from controlnet_aux.leres.leres.multi_depth_model_woauxi import RelDepthModel

    model = RelDepthModel(backbone="resnext101")
    model.load_state_dict(_strip_module(_load_state(paths[0])["depth_model"]), strict=True)
    model.eval()
    return LeresDetector(model, None)


def _build_openpose_part(part: str) -> Any:
    def build(paths: list[Path]) -> Any:
        from controlnet_aux.open_pose import Body, Face, Hand

        return {"body": Body, "hand": Hand, "face": Face}[part](str(paths[0]))

    return build


# ---- registry callables ----


def _detector(kind: str, file: WeightFile, models_dir: ModelsDir, annotator: str, build: Any) -> Any:
    """The cached detector `kind`; `build` is a builder or a controlnet-aux class name for from_pretrained."""
    builder = _build_from_pretrained(build) if isinstance(build, str) else build
    return cached_load(kind, (file,), builder, models_dir, annotator)


def canny(image: np.ndarray, resolution: int, models_dir: ModelsDir, params: Mapping[str, float]) -> np.ndarray:
    from controlnet_aux import CannyDetector

    low, high = int(params["low_threshold"]), int(params["high_threshold"])
    return CannyDetector()(image, low_threshold=low, high_threshold=high, **_sizes(resolution))


# Content shuffle warps the picture along a smooth random flow field whose features are this many pixels apart
# (ControlNet 1.1's default). Ours takes a seed, so that the same request gives the same hint (controlnet-aux's
# detector draws from numpy's global random state).
SHUFFLE_FEATURE = 256


def _noise_disk(rng: np.random.Generator, height: int, width: int, feature: int) -> np.ndarray:
    """Smooth noise in [0, 1]: coarse uniform noise, bicubic upsampled, cropped to the picture."""
    coarse = rng.uniform(0.0, 1.0, size=(height // feature + 2, width // feature + 2))
    fine = cv2.resize(coarse, (width + 2 * feature, height + 2 * feature), interpolation=cv2.INTER_CUBIC)
    fine = fine[feature : feature + height, feature : feature + width]
    fine = fine - fine.min()
    return fine / max(float(fine.max()), 1e-12)


def shuffle(image: np.ndarray, resolution: int, models_dir: ModelsDir, params: Mapping[str, float]) -> np.ndarray:
    h0, w0 = image.shape[:2]
    k = resolution / min(h0, w0)
    height, width = max(1, round(h0 * k)), max(1, round(w0 * k))
    img = cv2.resize(image, (width, height), interpolation=cv2.INTER_AREA if k < 1 else cv2.INTER_CUBIC)
    rng = np.random.default_rng(int(params["seed"]))
    x = _noise_disk(rng, height, width, SHUFFLE_FEATURE) * (width - 1)
    y = _noise_disk(rng, height, width, SHUFFLE_FEATURE) * (height - 1)
    flow = np.stack([x, y], axis=2).astype(np.float32)  # (h, w, 2): where each output pixel reads from
    return cv2.remap(img, flow, None, cv2.INTER_LINEAR)


def mlsd(image: np.ndarray, resolution: int, models_dir: ModelsDir, params: Mapping[str, float]) -> np.ndarray:
    det = _detector("mlsd", MLSD_FILE, models_dir, "mlsd", "MLSDdetector")
    return det(image, thr_v=params["value_threshold"], thr_d=params["distance_threshold"], **_sizes(resolution))


def depth_midas(image: np.ndarray, resolution: int, models_dir: ModelsDir, params: Mapping[str, float]) -> np.ndarray:
    det = _detector("midas", MIDAS_FILE, models_dir, "depth_midas", "MidasDetector")
    return det(image, **_sizes(resolution))


def depth_zoe(image: np.ndarray, resolution: int, models_dir: ModelsDir, params: Mapping[str, float]) -> np.ndarray:
    det = _detector("zoe", ZOE_FILE, models_dir, "depth_zoe", "ZoeDetector")
    return det(image, **_sizes(resolution))


def depth_leres(image: np.ndarray, resolution: int, models_dir: ModelsDir, params: Mapping[str, float]) -> np.ndarray:
    det = _detector("leres", LERES_FILE, models_dir, "depth_leres", _build_leres)
    near, background = params["remove_near"], params["remove_background"]
    return det(image, thr_a=near, thr_b=background, boost=False, **_sizes(resolution))


def normal_bae(image: np.ndarray, resolution: int, models_dir: ModelsDir, params: Mapping[str, float]) -> np.ndarray:
    det = _detector("normal_bae", NORMAL_BAE_FILE, models_dir, "normal_bae", "NormalBaeDetector")
    return det(image, **_sizes(resolution))


def _edges(name: str, family: str, *, scribble: bool, safe: bool) -> DetectFn:
    """HED / PiDiNet soft edges: `safe` quantises them (fewer hidden details), `scribble` thins + binarises them."""
    file, cls_name = (HED_FILE, "HEDdetector") if family == "hed" else (PIDINET_FILE, "PidiNetDetector")

    def run(image: np.ndarray, resolution: int, models_dir: ModelsDir, params: Mapping[str, float]) -> np.ndarray:
        det = _detector(family, file, models_dir, name, cls_name)
        return det(image, scribble=scribble, safe=safe, **_sizes(resolution))

    return run


scribble_hed = _edges("scribble_hed", "hed", scribble=True, safe=False)
scribble_pidinet = _edges("scribble_pidinet", "pidinet", scribble=True, safe=False)
softedge_hed = _edges("softedge_hed", "hed", scribble=False, safe=False)
softedge_hedsafe = _edges("softedge_hedsafe", "hed", scribble=False, safe=True)
softedge_pidinet = _edges("softedge_pidinet", "pidinet", scribble=False, safe=False)
softedge_pidisafe = _edges("softedge_pidisafe", "pidinet", scribble=False, safe=True)


def lineart(image: np.ndarray, resolution: int, models_dir: ModelsDir, params: Mapping[str, float]) -> np.ndarray:
    # controlnet-aux returns 255 - generator output: the generator draws dark lines on white paper, the ControlNet
    # 1.1 lineart models were fed 1 - that (white lines on black), so the library output is already the hint.
    det = _detector("lineart", LINEART_FILE, models_dir, "lineart", _build_lineart)
    return det(image, coarse=False, **_sizes(resolution))


def lineart_coarse(
    image: np.ndarray, resolution: int, models_dir: ModelsDir, params: Mapping[str, float]
) -> np.ndarray:
    det = _detector("lineart_coarse", LINEART_COARSE_FILE, models_dir, "lineart_coarse", _build_lineart)
    return det(image, coarse=True, **_sizes(resolution))


def lineart_anime(image: np.ndarray, resolution: int, models_dir: ModelsDir, params: Mapping[str, float]) -> np.ndarray:
    # Same polarity rule as lineart: the result is white lines on black.
    det = _detector("lineart_anime", LINEART_ANIME_FILE, models_dir, "lineart_anime", "LineartAnimeDetector")
    return det(image, **_sizes(resolution))


def _openpose(hand: bool, face: bool) -> DetectFn:
    """OpenPose with the body always, hands and/or face on request; only the needed files are required."""
    name = "openpose_full" if hand and face else "openpose_hand" if hand else "openpose_face" if face else "openpose"

    def run(image: np.ndarray, resolution: int, models_dir: ModelsDir, params: Mapping[str, float]) -> np.ndarray:
        from controlnet_aux import OpenposeDetector

        wanted = (
            [("body", OPENPOSE_BODY_FILE)]
            + [("hand", OPENPOSE_HAND_FILE)] * hand
            + [("face", OPENPOSE_FACE_FILE)] * face
        )
        # The parts are cached separately (the body model is shared by all four variants), so check every file
        # not yet loaded first: one error then lists all that are missing, not just the first.
        todo = [file for kind, file in wanted if not is_loaded(f"openpose_{kind}", models_dir)]
        if todo:
            resolve(todo, models_dir, name)
        parts = {
            kind: cached_load(f"openpose_{kind}", (file,), _build_openpose_part(kind), models_dir, name)
            for kind, file in wanted
        }
        body, hands, faces = parts["body"], parts.get("hand"), parts.get("face")
        det = OpenposeDetector(body, hands, faces)
        return det(image, include_body=True, include_hand=hand, include_face=face, **_sizes(resolution))

    return run


openpose = _openpose(hand=False, face=False)
openpose_hand = _openpose(hand=True, face=False)
openpose_face = _openpose(hand=False, face=True)
openpose_full = _openpose(hand=True, face=True)
