"""A jobs file (CSV with a header row, or JSON Lines) read into Job records, one per row, over defaults.

Each row names its hint (`hint`: a picture used as it is) or a picture and a preprocessor (`image`,
`preprocessor`), a ControlNet (`controlnet`: a file or folder, or a condition key such as `canny` looked up in the
models folder), a prompt and any generation setting; an empty or missing cell takes the default (the command
line's). A cell that cannot be read (a word where a number belongs) makes that row a RowError; the other rows go
on. Columns that are not settings are kept as words for the prompt template: `{name}` in a prompt is replaced by
the row's `name` column, `{stem}` by the picture's file name without extension, `{id}` by the row's id.
Relative paths are relative to the jobs file's folder.

The file is read as a stream (`cldm.scale.rows`): a row that cannot be read is that row's RowError, and memory does not
grow with the file. `Names` gives each row file names that no other row has.
"""

from __future__ import annotations

import hashlib
import json
import re
import reprlib
from collections.abc import Iterator
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

from cldm.errors import InputError
from cldm.pipeline.request import MAX_BATCH
from cldm.pipeline.union import ControlType
from cldm.pipeline.vocabulary import Choice, ControlMode, ResizeMode
from cldm.scale.rows import iter_rows

# setting -> (type, default); the defaults are the CLI's (`python -m cldm generate`)
SETTINGS: dict[str, tuple[type, object]] = {
    "id": (str, ""),
    "hint": (str, ""),
    "image": (str, ""),
    "preprocessor": (str, ""),  # "" = the condition's default preprocessor ("none" for a ControlNet file)
    "resolution": (int, 0),  # preprocessor resolution; 0 = pixel perfect
    "controlnet": (str, ""),
    "prompt": (str, ""),
    "negative_prompt": (str, ""),
    "seed": (int, 0),
    "steps": (int, 20),
    "cfg": (float, 7.5),
    "sampler": (str, "ddim"),
    "width": (int, 0),  # 0 = the model card's size, else 512
    "height": (int, 0),
    "scale": (float, 1.0),
    "start": (float, 0.0),
    "end": (float, 1.0),
    "control_mode": (ControlMode, ControlMode.BALANCED),  # a key ("prompt") or A1111's label
    "resize_mode": (ResizeMode, ResizeMode.CROP),
    "clip_skip": (int, 0),  # 0 = the condition's own (2 for lineart anime), else 1
    "pictures": (int, 1),  # pictures per row: seed, seed + 1, ... (one seed per picture)
    "init_image": (str, ""),
    "strength": (float, 1.0),
    "control_type": (ControlType, None),  # a ControlNet Union's; None = the one the preprocessor names
    "mask": (str, ""),  # the unit's effective region: a picture, white where it acts; "" = everywhere
}
ALIASES = {
    "negative": "negative_prompt", "control_scale": "scale", "control_start": "start", "control_end": "end",
    "cfg_scale": "cfg", "guidance": "cfg", "processor_res": "resolution", "preprocessor_resolution": "resolution",
    "denoising_strength": "strength", "denoise": "strength", "batch": "pictures", "picture": "image",
    "module": "preprocessor", "model": "controlnet", "controlnet_mask": "mask", "region": "mask",
}  # fmt: skip
PATHS = ("hint", "image", "init_image", "mask")
OPTIONAL = {"control_type": None, "mask": ""}  # left out of a row's fingerprint at these values (older rows' stay)
# File names: `<id>.png` or `<id>-<i>.png`, and write_atomic's `.<name>.<pid>.<thread id>.part` beside it. 255
# bytes is the name limit of common file systems; MAX_ID leaves room for `~<row>`, `-<i>.png` and those 35 bytes.
MAX_ID = 120
WEIGHT_SUFFIXES = (".safetensors", ".pth", ".ckpt", ".bin")
_ID = re.compile(r"[^A-Za-z0-9._-]+")  # ids keep these (ASCII: one byte each); the rest becomes `_`
ROW_MARK = "~"  # never in a sanitised id, so `<id>~<row>` cannot be another row's name
_PICTURE = re.compile(r"(.+)-(0|[1-9][0-9]*)")  # `a-1`: also the second picture of a row `a` with several
WINDOWS_DEVICES = {"CON", "PRN", "AUX", "NUL", *(f"{p}{i}" for p in ("COM", "LPT") for i in range(1, 10))}
_FIELD = re.compile(r"\{([A-Za-z_][A-Za-z0-9_]*)\}")


@dataclass(frozen=True)
class Job:
    """One row, every setting resolved to a value (paths absolute). `words` are its other columns."""

    row: int  # 0-based data row in the file
    id: str
    hint: str
    image: str
    preprocessor: str
    resolution: int
    controlnet: str
    prompt: str
    negative_prompt: str
    seed: int
    steps: int
    cfg: float
    sampler: str
    width: int
    height: int
    scale: float
    start: float
    end: float
    control_mode: ControlMode
    resize_mode: ResizeMode
    clip_skip: int
    pictures: int
    init_image: str
    strength: float
    control_type: ControlType | None = None
    mask: str = ""
    words: tuple[tuple[str, str], ...] = ()

    def fingerprint(self, base: str = "") -> str:
        """What decides the pictures: every setting and the base, not the row number. A rerun regenerates a row
        whose fingerprint changed."""
        d = {k: v.key if isinstance(v, Choice) else v for k, v in asdict(self).items()}  # the keys: stable names
        d.pop("row")
        for name, unset in OPTIONAL.items():
            if d[name] == unset:
                d.pop(name)
        d["base"] = base
        return hashlib.sha256(json.dumps(d, sort_keys=True, default=str).encode()).hexdigest()[:16]

    def file_names(self) -> list[str]:
        return [f"{self.id}.png"] if self.pictures == 1 else [f"{self.id}-{i}.png" for i in range(self.pictures)]


@dataclass(frozen=True)
class RowError:
    """A row that cannot even be read; it goes into the manifest as failed."""

    row: int
    id: str
    error: str


def _value(name: str, kind: type, raw: object) -> object:
    if kind is str:
        return str(raw)
    if issubclass(kind, Choice):
        return kind(str(raw))  # ValueError for a name it does not know
    if isinstance(raw, bool) or (isinstance(raw, str) and not raw.strip()):
        raise ValueError
    number = float(raw)  # OverflowError for an integer too large for a float
    if number != number or number in (float("inf"), float("-inf")):
        raise ValueError
    if kind is int:
        if number != int(number):
            raise ValueError
        return int(number)
    return number


def _exists(path: Path) -> bool:
    try:
        return path.exists()
    except OSError:  # a name too long for the file system
        return False


def _path(folder: Path, value: str, column: str) -> str:
    """A path cell made absolute (relative to the jobs file's folder)."""
    try:
        return str((folder / value).resolve())
    except (OSError, ValueError) as e:  # a NUL character, a name too long
        raise InputError(f"{column} is not a usable path ({type(e).__name__}: {reprlib.repr(value)})") from None


def _template(text: str, words: dict[str, str]) -> str:
    """`{name}` replaced by the row's word of that name; any other braces are left as they are."""
    return _FIELD.sub(lambda m: words.get(m.group(1), m.group(0)), text)


def make_job(row: int, raw: dict[str, object], defaults: dict[str, object], folder: Path) -> Job:
    """One row over the defaults. Raises InputError naming every cell that cannot be read."""
    values = {k: d for k, (_, d) in SETTINGS.items()}
    values.update({k: v for k, v in defaults.items() if k in SETTINGS and v is not None})
    words, problems = {}, []
    for key, cell in raw.items():
        name = ALIASES.get(str(key).strip().lower(), str(key).strip().lower())
        if cell is None or (isinstance(cell, str) and not cell.strip()):
            continue  # an empty cell keeps the default
        if name not in SETTINGS:
            words[str(key).strip()] = str(cell)
            continue
        try:
            values[name] = _value(name, SETTINGS[name][0], cell)
        except (TypeError, ValueError, OverflowError):
            kind = {int: "a whole number", float: "a finite number"}.get(SETTINGS[name][0])
            if kind is None:
                kind = f"one of {', '.join(SETTINGS[name][0].keys())}"
            problems.append(f"{key} must be {kind} (got {reprlib.repr(cell)})")
    for name in ("control_mode", "resize_mode"):  # the command line's defaults come as keys
        try:
            values[name] = SETTINGS[name][0](values[name])
        except ValueError:
            problems.append(f"{name} must be one of {', '.join(SETTINGS[name][0].keys())} (got {values[name]!r})")
    if problems:
        raise InputError("; ".join(problems))
    if not 1 <= int(values["pictures"]) <= MAX_BATCH:
        raise InputError(f"pictures must be 1..{MAX_BATCH} (got {values['pictures']})")
    for name in PATHS:
        if values[name]:
            values[name] = _path(folder, str(values[name]), name)
    if values["hint"] and values["image"]:
        raise InputError("give a hint or an image (with its preprocessor), not both")
    if not (values["hint"] or values["image"]):
        raise InputError("no picture: give a hint (used as it is) or an image and a preprocessor")
    if values["hint"]:
        values["image"], values["preprocessor"], values["hint"] = values["hint"], "none", ""
    if not values["controlnet"]:
        raise InputError("no ControlNet: give a controlnet column (a file, a folder or a condition such as canny)")
    controlnet = str(values["controlnet"])
    if "/" in controlnet or "\\" in controlnet or controlnet.endswith(WEIGHT_SUFFIXES) or _exists(folder / controlnet):
        values["controlnet"] = _path(folder, controlnet, "controlnet")
    stem = Path(str(values["image"])).stem
    ident = safe_id(values["id"], row)
    words.update(id=ident, stem=stem)
    values.update(id=ident, prompt=_template(str(values["prompt"]), words),
                  negative_prompt=_template(str(values["negative_prompt"]), words))  # fmt: skip
    names = {f.name for f in fields(Job)} - {"row", "words"}
    return Job(row=row, words=tuple(sorted(words.items())), **{k: values[k] for k in names})


def safe_id(raw: object, row: int) -> str:
    """A row's id as a file name stem: letters, digits, `.`, `_`, `-` (others become `_`), at most MAX_ID bytes (a
    longer one keeps its start and gets a hash of the whole), no Windows device name; "" becomes the row number."""
    text = "" if raw is None else str(raw)
    ident = _ID.sub("_", text).strip("._")
    if len(ident) > MAX_ID:
        digest = hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=4).hexdigest()
        ident = f"{ident[: MAX_ID - len(digest) - 1]}_{digest}"
    if ident.split(".")[0].upper() in WINDOWS_DEVICES:
        ident = f"_{ident}"
    return ident or f"{row:05d}"


def job_or_error(row: int, raw: dict[str, object] | str, defaults: dict[str, object], folder: Path) -> Job | RowError:
    """`make_job`, or the RowError saying why the row (or the line, when `raw` is that) cannot be one."""
    if isinstance(raw, str):
        return RowError(row, f"{row:05d}", raw)
    try:
        return make_job(row, raw, defaults, folder)
    except InputError as e:
        return RowError(row, safe_id(raw.get("id"), row), str(e))


def iter_jobs(path: str | Path, defaults: dict[str, object] | None = None) -> Iterator[Job | RowError]:
    """Every row of the jobs file as a Job, or a RowError saying what is wrong with it, one at a time (the file
    is checked now, read as the rows are asked for). Ids are not yet unique: `Names` makes them so."""
    folder = Path(path).resolve().parent
    rows = iter_rows(path)
    return (job_or_error(i, raw, defaults or {}, folder) for i, raw in enumerate(rows))


def read_jobs(path: str | Path, defaults: dict[str, object] | None = None) -> tuple[list[Job], list[RowError]]:
    """The whole jobs file at once (small files): its Jobs and RowErrors, ids made unique by `Names`."""
    jobs, bad, names = [], [], Names()
    for item in iter_jobs(path, defaults):
        item = names.assign(item)
        (jobs if isinstance(item, Job) else bad).append(item)
    return jobs, bad


def _key(stem: str) -> int:
    """A stem as file systems that ignore case (macOS, Windows) compare it, hashed to 8 bytes."""
    return int.from_bytes(hashlib.blake2b(stem.lower().encode(), digest_size=8).digest(), "little")


class Names:
    """Each row's id made unique as a file name: a row whose file names an earlier row has (ignoring case) gets
    `~<row>` added. Decided row by row from the ids and picture counts alone, so a rerun of the same file gives each
    row the same names. The names kept are 8-byte hashes; a false match only adds `~<row>`, the same on every run."""

    def __init__(self) -> None:
        self._taken: set[int] = set()  # every row's stem
        self._several: dict[int, int] = {}  # stems of rows with several pictures -> how many (`<stem>-<i>.png`)

    def assign(self, item: Job | RowError) -> Job | RowError:
        """The row with its unique id; rows must come in file order. A RowError takes its name too: fixing it
        changes no other row's name."""
        stem, pictures = item.id, item.pictures if isinstance(item, Job) else 1
        if ROW_MARK in stem:  # made unique already (read_jobs): no other row can have it
            return item
        if self._clashes(stem, pictures):
            return replace(item, id=f"{stem}{ROW_MARK}{item.row}")
        self._taken.add(_key(stem))
        if pictures > 1:
            self._several[_key(stem)] = pictures
        return item

    def _clashes(self, stem: str, pictures: int) -> bool:
        if _key(stem) in self._taken:
            return True
        if pictures > 1:  # `<stem>-<i>.png` may be an earlier row's `<stem>-<i>`
            return any(_key(f"{stem}-{i}") in self._taken for i in range(pictures))
        m = _PICTURE.fullmatch(stem)  # `a-1` may be the second picture of an earlier row `a`
        return m is not None and self._several.get(_key(m[1]), 0) > int(m[2])
