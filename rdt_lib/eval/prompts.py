"""Prompt sets for the evaluation sweep: the set shipped with rdt, local files, Hugging Face datasets.

:func:`load_prompts` takes a source:

- ``"default"``: :data:`DEFAULT_PROMPTS`, 24 prompts written for this project (people, animals, objects, scenes,
  text and counting, several styles), small enough for a quick sweep, varied enough that the rewards and the
  diversity measure have something to tell apart.
- a ``.txt`` file (one prompt per line; blank lines and lines starting with ``#`` skipped), a ``.json`` file (a
  list of strings, or of objects with a prompt column) or a ``.csv`` file (a prompt column, by name).
- a known benchmark by name (:data:`KNOWN_DATASETS`: ``hpdv2``, ``parti``, ``drawbench``) or ``hf:<dataset id>``,
  read with the ``datasets`` package when it is installed (an :class:`~rdt_lib.errors.InputError` saying how to
  install it when not).

Errors (a missing, unreadable or empty file, no prompt column) are :class:`~rdt_lib.errors.InputError` /
:class:`~rdt_lib.errors.MissingFileError` naming the file and what is accepted.
"""

from __future__ import annotations

import csv
import io
import json
from pathlib import Path
from typing import Any, Sequence

from ..errors import InputError, MissingFileError

__all__ = ["DEFAULT_PROMPTS", "KNOWN_DATASETS", "PROMPT_COLUMNS", "load_prompts"]

DEFAULT_PROMPTS: tuple[str, ...] = (
    "a portrait of an elderly fisherman with a weathered face, golden hour light",
    "a red fox curled up asleep in fresh snow",
    "a bowl of ramen with a soft-boiled egg, top-down food photography",
    "a lighthouse on a rocky cliff during a storm, oil painting",
    "a cozy reading nook with a window seat and stacks of books",
    "an astronaut riding a horse across a desert, cinematic",
    "a watercolor painting of a Venetian canal at dawn",
    "three green apples and one red apple on a wooden table",
    "a neon sign that says OPEN in a rainy alley at night",
    "a child flying a kite on a windy beach",
    "a futuristic city skyline with flying trains, digital art",
    "a close-up of a hummingbird drinking from a purple flower",
    "a vintage bicycle leaning against a brick wall covered in ivy",
    "a majestic snow-capped mountain reflected in a still lake",
    "a corgi wearing a tiny knitted sweater, studio photo",
    "a medieval knight in ornate armor, charcoal sketch",
    "a steaming cup of coffee next to an open notebook on a cafe table",
    "a tropical rainforest waterfall with mist and sunbeams",
    "an isometric illustration of a tiny island with a windmill",
    "a street market in Marrakech full of colorful spices",
    "a glass sculpture of a jellyfish glowing in the dark",
    "a black and white photo of a jazz trio performing on stage",
    "a cute robot watering plants in a greenhouse, 3d render",
    "an ancient library with towering shelves and floating candles",
)
"""The prompt set shipped with rdt (the default of ``prompts.source``)."""

#: benchmark name -> (Hugging Face dataset id, split, prompt column). Read with ``datasets.load_dataset``.
KNOWN_DATASETS: dict[str, tuple[str, str, str]] = {
    "hpdv2": ("zhwang/HPDv2", "test", "prompt"),
    "parti": ("nateraw/parti-prompts", "train", "Prompt"),
    "partiprompts": ("nateraw/parti-prompts", "train", "Prompt"),
    "drawbench": ("sayakpaul/drawbench", "train", "Prompts"),
}

#: column names tried, in order, when none is given
PROMPT_COLUMNS: tuple[str, ...] = ("prompt", "Prompt", "Prompts", "prompts", "caption", "text")

_INSTALL_DATASETS = "pip install datasets"


def load_prompts(source: str = "default", *, column: str = "", split: str = "", limit: int = 0,
                 inline: Sequence[str] = ()) -> list[str]:
    """The prompts of ``source`` (see the module docstring), blanks stripped, in order; the first ``limit``
    (0 = all). ``inline`` prompts, when given, are used instead of ``source``.

    Raises:
        MissingFileError: a local file that does not exist.
        InputError: an unreadable or empty file, no prompt column, an unknown name, ``datasets`` not installed.
    """
    if inline:
        prompts = [str(p).strip() for p in inline]
        where = "prompts.text"
    else:
        prompts, where = _from_source(source.strip(), column, split)
    prompts = [p for p in prompts if p]
    if not prompts:
        raise InputError(f"the prompt set {where} has no prompts; give a file with one prompt per line (or a .json "
                         f"list / .csv with a prompt column), or use prompts.source = 'default'")
    return prompts[:limit] if limit > 0 else prompts


def _from_source(source: str, column: str, split: str) -> tuple[list[str], str]:
    if source.lower() in ("", "default"):
        return list(DEFAULT_PROMPTS), "'default'"
    key = source.lower()
    if key in KNOWN_DATASETS or source.startswith("hf:"):
        return _from_dataset(source, column, split), repr(source)
    path = Path(source).expanduser()
    suffix = path.suffix.lower()
    if path.is_dir():
        raise InputError(f"prompts.source {source!r} is a folder; give a .txt, .json or .csv file")
    if suffix not in (".txt", ".json", ".csv", ".tsv"):
        if not path.exists():
            raise InputError(f"prompts.source {source!r} is neither a prompt file (.txt, .json, .csv) nor a known "
                             f"prompt set ({', '.join(['default', *KNOWN_DATASETS])}) nor hf:<dataset id>")
    if not path.is_file():
        raise MissingFileError(f"prompt file {str(path)!r} does not exist")
    try:
        text = path.read_text(encoding="utf-8-sig")
    except UnicodeDecodeError as err:
        raise InputError(f"prompt file {str(path)!r} is not UTF-8 text ({err.reason} at byte {err.start}); "
                         "save it as UTF-8") from err
    except OSError as err:
        raise InputError(f"prompt file {str(path)!r} cannot be read: {err.strerror or err}") from err
    if suffix == ".json":
        return _from_json(text, path, column), repr(str(path))
    if suffix in (".csv", ".tsv"):
        return _from_csv(text, path, column, "\t" if suffix == ".tsv" else ","), repr(str(path))
    return [line.strip() for line in text.splitlines() if not line.strip().startswith("#")], repr(str(path))


def _pick_column(names: Sequence[str], column: str, where: str) -> str:
    if column:
        if column not in names:
            raise InputError(f"{where} has no column {column!r}; its columns: {', '.join(map(str, names))}")
        return column
    for name in PROMPT_COLUMNS:
        if name in names:
            return name
    raise InputError(f"{where} has no prompt column ({', '.join(PROMPT_COLUMNS)}); its columns: "
                     f"{', '.join(map(str, names))}; name one with prompts.column")


def _from_json(text: str, path: Path, column: str) -> list[str]:
    try:
        data: Any = json.loads(text)
    except json.JSONDecodeError as err:
        raise InputError(f"prompt file {str(path)!r} is not valid JSON: {err}") from err
    if isinstance(data, dict) and isinstance(data.get("prompts"), list):
        data = data["prompts"]
    if not isinstance(data, list):
        raise InputError(f"prompt file {str(path)!r} must hold a JSON list of strings (or of objects with a prompt "
                         f"key), got {type(data).__name__}")
    out = []
    for i, item in enumerate(data):
        if isinstance(item, str):
            out.append(item)
        elif isinstance(item, dict):
            out.append(str(item[_pick_column(list(item), column, f"{path} item {i}")]))
        else:
            raise InputError(f"prompt file {str(path)!r} item {i} is {type(item).__name__}, not a string or object")
    return out


def _from_csv(text: str, path: Path, column: str, delimiter: str) -> list[str]:
    reader = csv.DictReader(io.StringIO(text), delimiter=delimiter)
    if not reader.fieldnames:
        return []
    name = _pick_column(reader.fieldnames, column, f"prompt file {str(path)!r}")
    return [row.get(name) or "" for row in reader]


def _from_dataset(source: str, column: str, split: str) -> list[str]:
    key = source.lower()
    if key in KNOWN_DATASETS:
        dataset_id, default_split, default_column = KNOWN_DATASETS[key]
    else:
        dataset_id, default_split, default_column = source[3:], "test", ""
    try:
        import datasets
    except ImportError:
        raise InputError(f"the prompt set {source!r} is the Hugging Face dataset {dataset_id!r}, which needs the "
                         f"datasets package: {_INSTALL_DATASETS} (or give a local .txt / .json / .csv file)") from None
    try:
        data = datasets.load_dataset(dataset_id, split=split or default_split)
    except Exception as err:  # noqa: BLE001 - the hub, a missing split, a script dataset: all the user's to fix
        raise InputError(f"could not load the dataset {dataset_id!r} (split {split or default_split!r}): "
                         f"{str(err).splitlines()[0] if str(err) else type(err).__name__}") from err
    name = _pick_column(list(data.column_names), column or default_column, f"dataset {dataset_id!r}")
    return [str(p) for p in data[name]]
