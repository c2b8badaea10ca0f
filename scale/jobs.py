"""A jobs file (CSV with a header row, or JSON Lines) read into Job records, one per row, over defaults.

Each row names its hint (`hint`: a picture used as it is) or a picture and a preprocessor (`image`,
`preprocessor`), a ControlNet (`controlnet`: a file or folder, or a condition key such as `canny` looked up in the
models folder), a prompt and any generation setting; an empty or missing cell takes the default (the command
line's). A cell that cannot be read (a word where a number belongs) makes that row a RowError; the other rows go
on. Columns that are not settings are kept as words for the prompt template: `{name}` in a prompt is replaced by
the row's `name` column, `{stem}` by the picture's file name without extension, `{id}` by the row's id.
Relative paths are relative to the jobs file's folder.
"""

from __future__ import annotations

import csv
import hashlib
import json
import re
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

from cldm.errors import InputError

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
    "control_mode": (str, "balanced"),
    "resize_mode": (str, "crop"),
    "clip_skip": (int, 0),  # 0 = the condition's own (2 for lineart anime), else 1
    "pictures": (int, 1),  # pictures per row: seed, seed + 1, ... (one seed per picture)
    "init_image": (str, ""),
    "strength": (float, 1.0),
}
ALIASES = {
    "negative": "negative_prompt", "control_scale": "scale", "control_start": "start", "control_end": "end",
    "cfg_scale": "cfg", "guidance": "cfg", "processor_res": "resolution", "preprocessor_resolution": "resolution",
    "denoising_strength": "strength", "denoise": "strength", "batch": "pictures", "picture": "image",
    "module": "preprocessor", "model": "controlnet",
}  # fmt: skip
PATHS = ("hint", "image", "init_image")
MAX_ROWS = 1_000_000
_ID = re.compile(r"[^A-Za-z0-9._-]+")
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
    control_mode: str
    resize_mode: str
    clip_skip: int
    pictures: int
    init_image: str
    strength: float
    words: tuple[tuple[str, str], ...] = ()

    def fingerprint(self, base: str = "") -> str:
        """What decides the pictures: every setting and the base, not the row number. A rerun regenerates a row
        whose fingerprint changed."""
        d = asdict(self)
        d.pop("row")
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


def read_rows(path: str | Path) -> list[dict[str, object]]:
    """The file's rows as dicts: CSV (.csv, .tsv, with a header row) or JSON Lines (.jsonl, .json: one object per
    line)."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8-sig")
    except FileNotFoundError:
        raise InputError(f"jobs file {path} does not exist") from None
    except (OSError, UnicodeDecodeError) as e:
        raise InputError(f"jobs file {path} cannot be read as UTF-8 text: {e}") from None
    if path.suffix.lower() in (".jsonl", ".json", ".ndjson"):
        rows = []
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except json.JSONDecodeError as e:
                row = {"__error__": f"line {n} is not JSON: {e.msg}"}
            rows.append(row if isinstance(row, dict) else {"__error__": f"line {n} is not a JSON object"})
    elif path.suffix.lower() in (".csv", ".tsv", ".txt"):
        reader = csv.DictReader(text.splitlines(), delimiter="\t" if path.suffix.lower() == ".tsv" else ",")
        if not reader.fieldnames:
            raise InputError(f"jobs file {path} has no header row (e.g. hint,controlnet,prompt,seed)")
        rows = [{k.strip(): v for k, v in r.items() if k is not None} for r in reader]
    else:
        raise InputError(f"jobs file {path}: give a .csv, .tsv or .jsonl file (got {path.suffix or 'no extension'})")
    if len(rows) > MAX_ROWS:
        raise InputError(f"jobs file {path} has {len(rows)} rows; split it into files of at most {MAX_ROWS}")
    return rows


def _value(name: str, kind: type, raw: object) -> object:
    if kind is str:
        return str(raw)
    if isinstance(raw, bool) or (isinstance(raw, str) and not raw.strip()):
        raise ValueError
    if kind is int:
        number = float(raw)
        if number != int(number):
            raise ValueError
        return int(number)
    number = float(raw)
    if number != number or number in (float("inf"), float("-inf")):
        raise ValueError
    return number


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
        except (TypeError, ValueError):
            kind = "a whole number" if SETTINGS[name][0] is int else "a number"
            problems.append(f"{key} must be {kind} (got {cell!r})")
    if problems:
        raise InputError("; ".join(problems))
    for name in PATHS:
        if values[name]:
            values[name] = str((folder / str(values[name])).resolve())
    if values["hint"] and values["image"]:
        raise InputError("give a hint or an image (with its preprocessor), not both")
    if not (values["hint"] or values["image"]):
        raise InputError("no picture: give a hint (used as it is) or an image and a preprocessor")
    if values["hint"]:
        values["image"], values["preprocessor"], values["hint"] = values["hint"], "none", ""
    if not values["controlnet"]:
        raise InputError("no ControlNet: give a controlnet column (a file, a folder or a condition such as canny)")
    controlnet = str(values["controlnet"])
    if "/" in controlnet or "\\" in controlnet or (folder / controlnet).exists() or controlnet.endswith(
            (".safetensors", ".pth", ".ckpt", ".bin")):  # fmt: skip
        values["controlnet"] = str((folder / controlnet).resolve())
    stem = Path(str(values["image"])).stem
    ident = _ID.sub("_", str(values["id"]) or f"{row:05d}").strip("._") or f"{row:05d}"
    words.update(id=ident, stem=stem)
    values.update(id=ident, prompt=_template(str(values["prompt"]), words),
                  negative_prompt=_template(str(values["negative_prompt"]), words))  # fmt: skip
    names = {f.name for f in fields(Job)} - {"row", "words"}
    return Job(row=row, words=tuple(sorted(words.items())), **{k: values[k] for k in names})


def read_jobs(path: str | Path, defaults: dict[str, object] | None = None) -> tuple[list[Job], list[RowError]]:
    """Every row of the jobs file as a Job, or a RowError saying what is wrong with it. Two rows with the same id
    would write the same file: the later ones get `-2`, `-3`... added."""
    folder = Path(path).resolve().parent
    jobs, bad, seen = [], [], {}
    for i, raw in enumerate(read_rows(path)):
        fallback = _ID.sub("_", str(raw.get("id") or "")).strip("._") or f"{i:05d}"
        if "__error__" in raw:
            bad.append(RowError(i, fallback, str(raw["__error__"])))
            continue
        try:
            job = make_job(i, raw, defaults or {}, folder)
        except InputError as e:
            bad.append(RowError(i, fallback, str(e)))
            continue
        seen[job.id] = seen.get(job.id, 0) + 1
        jobs.append(job if seen[job.id] == 1 else replace(job, id=f"{job.id}-{seen[job.id]}"))
    return jobs, bad
