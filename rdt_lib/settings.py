"""Settings declared once, for every command line of rdt (the trainer, the evaluation sweep).

A command's configuration is a root pydantic model whose fields are sections: a table of settings
(:class:`Section` subclass) or a list of tables (``list[<Section subclass>]``, e.g. ``[[rewards]]``). Each
setting is declared with :func:`S` (type, default, range, accepted names, help). A :class:`SettingsSchema` built
from the root model, its preset folder and its registries of accepted names offers what the command line needs:

- :meth:`~SettingsSchema.load_config`: TOML / YAML files or preset names (each file's keys and types checked
  alone, so errors name the file), merged in order (tables key by key, lists replaced), then ``"section.key=value"``
  overrides (TOML literals; text for string keys; ``rewards.0.weight=2``, index ``len(rewards)`` appends a
  table), strict type checks (ints accepted for numbers), ranges and the command's own cross-field checks; every
  problem reported at once as one :class:`ConfigError`.
- :meth:`~SettingsSchema.setting_spec` / :meth:`~SettingsSchema.setting_specs` / :meth:`~SettingsSchema.all_keys`:
  the declarations read back (for user interfaces and tests).
- :meth:`~SettingsSchema.format_help` (``--help``), :meth:`~SettingsSchema.to_toml`,
  :meth:`~SettingsSchema.config_hash`, :meth:`~SettingsSchema.list_presets`, :meth:`~SettingsSchema.preset_path`.
"""

from __future__ import annotations

import argparse
import copy
import difflib
import hashlib
import json
import os
import re
import sys
import typing
from pathlib import Path
from typing import Annotated, Any, Callable, Iterable, Literal, Mapping, NamedTuple, Sequence, Union

import tomli_w
from pydantic import BaseModel, ConfigDict, Field, ValidationError

if sys.version_info >= (3, 11):
    import tomllib
else:  # pragma: no cover - exercised on Python 3.10 only
    import tomli as tomllib

__all__ = ["ConfigError", "S", "Section", "SettingSpec", "SettingsSchema", "parse_override", "not_one_of",
           "looks_local"]


class ConfigError(ValueError):
    """A configuration problem: unknown key, wrong type, invalid value or inconsistent settings."""


def S(default: Any = None, help: str = "", *, names: str | None = None, factory: Callable[[], Any] | None = None,
      **limits: float) -> Any:
    """One setting: default (or ``factory``), help line, range limits (ge, gt, le, lt), registry of accepted names
    (a key of the schema's ``name_lists``)."""
    extra = {"names": names} if names else None
    if factory is not None:
        return Field(default_factory=factory, description=help, json_schema_extra=extra, **limits)
    return Field(default, description=help, json_schema_extra=extra, **limits)


class Section(BaseModel):
    """A table of settings: unknown keys, wrong types (ints accepted for numbers) and NaN / inf are refused."""

    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


class SettingSpec(NamedTuple):
    """One setting as declared: ``type`` is int, float, bool, str or list (``annotation`` is the full type)."""

    key: str
    type: type
    default: Any
    ge: float | None
    gt: float | None
    le: float | None
    lt: float | None
    choices: tuple[str, ...] | None
    help: str
    annotation: Any


def _arms(tp: Any) -> list[Any]:
    """The parts of a type: Union/Optional arms, Annotated base types, Literal kept whole."""
    origin = typing.get_origin(tp)
    if origin is Union:
        return [a for arm in typing.get_args(tp) if arm is not type(None) for a in _arms(arm)]
    if origin is Annotated:
        return _arms(typing.get_args(tp)[0])
    return [tp]


def _limits(field: Any) -> dict[str, float]:
    found: dict[str, float] = {}
    metas = list(field.metadata)
    for arm in typing.get_args(field.annotation):  # constraints on a Union arm: Annotated[int, Field(ge=1)]
        if typing.get_origin(arm) is Annotated:
            metas += [m for info in typing.get_args(arm)[1:] for m in getattr(info, "metadata", [info])]
    for m in metas:
        for name in ("ge", "gt", "le", "lt"):
            if getattr(m, name, None) is not None:
                found[name] = getattr(m, name)
    return found


def _range_text(spec: SettingSpec) -> str:
    lo = f"[{spec.ge:g}" if spec.ge is not None else f"({spec.gt:g}" if spec.gt is not None else None
    hi = f"{spec.le:g}]" if spec.le is not None else f"{spec.lt:g})" if spec.lt is not None else None
    if lo and hi:
        return f"in {lo}, {hi}"
    if lo:
        return f"{'>=' if lo[0] == '[' else '>'} {lo[1:]}"
    if hi:
        return f"{'<=' if hi[-1] == ']' else '<'} {hi[:-1]}"
    return ""


def _type_name(tp: Any) -> str:
    arms = _arms(tp)
    words = []
    for a in arms:
        if typing.get_origin(a) is Literal:
            words.append("string" if len(arms) == 1 else " or ".join(json.dumps(v) for v in typing.get_args(a)))
        elif typing.get_origin(a) is list:
            elem = typing.get_args(a)[0]
            words.append("list of tables" if isinstance(elem, type) and issubclass(elem, BaseModel)
                         else f"list of {_type_name(elem)}s")
        else:
            words.append({bool: "boolean (true/false)", int: "integer", float: "number", str: "string"}.get(a, str(a)))
    return " or ".join(words)


def not_one_of(key: str, value: Any, accepted: Sequence[str], what: str = "{!r} is not one of") -> str:
    """``"<key>: 'x' is not one of a, b (did you mean 'a'?)"``."""
    close = difflib.get_close_matches(str(value), list(accepted), n=1, cutoff=0.5)
    return (f"{key}: {what.format(value)} {', '.join(accepted)}"
            + (f" (did you mean {close[0]!r}?)" if close else ""))


_HF_ID = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


def looks_local(value: str) -> bool:
    """A path (rather than a hub id): exists, is absolute/relative-explicit, has >1 '/', or a file suffix."""
    if Path(value).expanduser().exists() or value.startswith(("/", "./", "../", "~", "\\")):
        return True
    if re.match(r"^[A-Za-z]:[\\/]", value) or value.lower().endswith((".safetensors", ".ckpt", ".pt", ".bin")):
        return True
    return not _HF_ID.match(value)


def parse_override(text: str) -> tuple[str, Any, str]:
    """``"optim.lr=1e-4"`` -> ``("optim.lr", 1e-4, "1e-4")``: key, TOML-parsed value (raw text if not TOML), raw."""
    if "=" not in text:
        raise ConfigError(f"override {text!r} must look like section.key=value")
    key, raw = (part.strip() for part in text.split("=", 1))
    if not key:
        raise ConfigError(f"override {text!r} has no key before '='")
    try:
        return key, tomllib.loads(f"v = {raw}")["v"], raw
    except tomllib.TOMLDecodeError:
        return key, raw, raw


def _merge(base: dict[str, Any], new: Mapping[str, Any]) -> dict[str, Any]:
    out = dict(base)
    for key, value in new.items():
        both = isinstance(value, Mapping) and isinstance(out.get(key), Mapping)
        out[key] = _merge(out[key], value) if both else copy.deepcopy(value)
    return out


_RANGE_ERRORS = {"greater_than", "greater_than_equal", "less_than", "less_than_equal", "finite_number"}

CrossChecks = Callable[..., list[str]]


# ---------------------------------------------------------------------------------------------------------------
# registries of accepted names, shared by every command's settings (``S(..., names="schedulers")``)


def model_kinds() -> tuple[str, ...]:
    """Architectures :func:`rdt_lib.backbones.loading.load_backbone` accepts (its registry)."""
    from .backbones.loading import MODEL_KINDS

    return tuple(MODEL_KINDS)


def reward_names() -> tuple[str, ...]:
    """The reward names of the reward registry (:func:`rdt_lib.rewards.available`)."""
    from .rewards import available

    return tuple(available())


def sampler_names() -> tuple[str, ...]:
    """Sampler (step rule) names of :mod:`rdt_lib.sampling`."""
    from .sampling import SAMPLERS

    return tuple(SAMPLERS)


def scheduler_names() -> tuple[str, ...]:
    """Sigma-list names (and the legacy combined names, and ``auto``) of :mod:`rdt_lib.sampling`."""
    from .sampling import SCHEDULERS

    return tuple(SCHEDULERS)


NAME_REGISTRIES: dict[str, Callable[[], tuple[str, ...]]] = {
    "model_kinds": model_kinds, "rewards": reward_names, "samplers": sampler_names, "schedulers": scheduler_names}
"""The registries a setting's ``names=`` can refer to; the default ``name_lists`` of :class:`SettingsSchema`."""


class SettingsSchema:
    """The configuration machinery of one command, built from its declarations.

    Args:
        root: the root model; each field is a :class:`Section` or a ``list`` of one.
        preset_dir: folder of ``<name>.toml`` presets usable in place of a config file.
        name_lists: registries of accepted names, by the ``names=`` of :func:`S` (called when needed).
        cross_checks: ``fn(config, **options) -> [problem, ...]``: the command's cross-field and input checks;
            ``options`` are the extra keyword arguments of :meth:`load_config` / :meth:`validate_config`.
        synonyms: names other tools use for a setting -> our dotted key (suggested for unknown keys).
        program: the command, for the TOML header (``python -m rdt_lib.train``).
        title: what the configuration configures, for the TOML header.
        list_defaults: list sections -> words for their default in ``--help`` (``"one pickscore reward"``).
    """

    def __init__(self, root: type[BaseModel], *, preset_dir: Path, name_lists: Mapping[str, Callable[[], tuple[str, ...]]]
                 | None = None, cross_checks: CrossChecks | None = None, synonyms: Mapping[str, str] | None = None,
                 program: str = "", title: str = "", list_defaults: Mapping[str, str] | None = None) -> None:
        self.root = root
        self.preset_dir = Path(preset_dir)
        self.name_lists = dict(NAME_REGISTRIES if name_lists is None else name_lists)
        self.cross_checks = cross_checks
        self.synonyms = dict(synonyms or {})
        self.program = program
        self.title = title
        self.list_defaults = dict(list_defaults or {})
        self.sections: dict[str, type[BaseModel]] = {}
        self.list_sections: set[str] = set()
        for name, f in root.model_fields.items():
            ann = f.annotation
            if typing.get_origin(ann) is list:
                self.sections[name] = typing.get_args(ann)[0]
                self.list_sections.add(name)
            else:
                self.sections[name] = ann

    # -------------------------------------------------------------------------------------------- declarations
    def setting_spec(self, key: str) -> SettingSpec:
        """The declaration of one setting, e.g. ``setting_spec("optim.lr")`` (list tables as ``rewards.0.weight``
        or ``rewards.N.weight``)."""
        parts = key.split(".")
        if len(parts) == 3 and parts[0] in self.list_sections and (parts[1].isdigit() or parts[1] == "N"):
            parts = [parts[0], parts[2]]
        section, field = self.sections.get(parts[0]), None
        if section is not None and len(parts) == 2:
            field = section.model_fields.get(parts[1])
        if field is None:
            prefix = ".".join(key.split(".")[:-1]) or None
            raise ConfigError(f"unknown key {key!r}{self._suggest(parts[0] if section else None, parts[-1], prefix)}")
        arms = _arms(field.annotation)
        literals = tuple(v for a in arms if typing.get_origin(a) is Literal for v in typing.get_args(a))
        extra = field.json_schema_extra or {}
        pure_literal = typing.get_origin(field.annotation) is Literal
        choices = (tuple(self.name_lists[extra["names"]]()) if "names" in extra
                   else (literals if pure_literal else None))
        base = str if pure_literal else (typing.get_origin(arms[0]) or arms[0])
        name = f"{parts[0]}.N.{parts[1]}" if parts[0] in self.list_sections else f"{parts[0]}.{parts[1]}"
        return SettingSpec(name, base, field.get_default(call_default_factory=True),
                           *[_limits(field).get(n) for n in ("ge", "gt", "le", "lt")], choices,
                           field.description or "", field.annotation)

    def setting_specs(self) -> list[SettingSpec]:
        """Every setting's declaration, section by section (list-table fields once, as ``rewards.N.<field>``)."""
        return [self.setting_spec(f"{s}.{f}") for s, cls in self.sections.items() for f in cls.model_fields]

    def all_keys(self) -> list[str]:
        """Every dotted key, e.g. ``optim.lr``; list-table fields as ``rewards.N.name``."""
        return [f"{s}.N.{f}" if s in self.list_sections else f"{s}.{f}"
                for s, cls in self.sections.items() for f in cls.model_fields]

    # ------------------------------------------------------------------------------------------ error messages
    def _suggest(self, section: str | None, name: str, prefix: str | None = None) -> str:
        """'; did you mean ...?' for an unknown key ``name`` of ``section`` (None = top level) written as
        ``prefix.name`` (default prefix: the section)."""
        valid = list(self.sections[section].model_fields) if section else list(self.sections)
        prefix = prefix or section
        join = (lambda n: f"{prefix}.{n}") if prefix else (lambda n: n)
        everything = [k.replace(".N.", ".0.") for k in self.all_keys()]
        close = difflib.get_close_matches(name, valid, n=1, cutoff=0.6)
        elsewhere = [k for k in everything if k.rsplit(".", 1)[-1] == name]
        anywhere = difflib.get_close_matches(join(name), everything, n=1, cutoff=0.6)
        hint = (join(close[0]) if close else self.synonyms.get(name) or (elsewhere or anywhere or [None])[0])
        return f"; did you mean {hint!r}?" if hint else f"; valid keys here: {', '.join(valid)}"

    def _describe(self, errors: list[dict[str, Any]]) -> list[tuple[str, str]]:
        """pydantic errors -> ``(kind, message)`` with kind ``key``, ``type`` or ``value``, one per setting."""
        out: dict[str, tuple[str, str]] = {}
        for e in errors:
            loc, value = list(e["loc"]), e["input"]
            if e["type"] == "extra_forbidden":
                section = ".".join(str(p) for p in loc[:-1]) or None
                name = ".".join(str(p) for p in loc)
                msg = (f"unknown key {name!r}{self._suggest(str(loc[0]), str(loc[-1]), section)}"
                       if section else f"unknown section {name!r}{self._suggest(None, name)}")
                out[name] = ("key", msg)
                continue
            listed = loc[0] in self.list_sections
            path = [str(p) for p in loc[:3 if listed else 2]]
            field = None
            cls = self.sections.get(path[0])
            if listed and len(path) == 3:
                field = cls.model_fields[path[2]]
            elif not listed and len(path) == 2:
                field = cls.model_fields[path[1]]
            index = [str(p) for p in loc[len(path):] if isinstance(p, int)]  # list element
            key = ".".join(path + index)
            if key in out:
                continue
            if field is None:  # a whole section or list table of the wrong type
                what = ("a list of tables" if key in self.list_sections
                        else "a table" + ("" if "." in key else f" [{key}]"))
                out[key] = ("type", f"{key}: expected {what}, got {type(value).__name__} {value!r}")
                continue
            spec = self.setting_spec(".".join(path[::2] if listed else path))
            tp = typing.get_args(_arms(field.annotation)[0])[0] if index else field.annotation
            ranges = [x for x in errors
                      if x["type"] in _RANGE_ERRORS and [str(p) for p in x["loc"]][:len(path)] == path]
            if ranges and not index:
                what = "a finite number" if ranges[0]["type"] == "finite_number" else _range_text(spec)
                out[key] = ("value", f"{key} must be {what}, got {value}")
            elif e["type"] == "literal_error" and spec.type is str and isinstance(value, str) and spec.choices:
                out[key] = ("value", not_one_of(key, value, spec.choices))
            else:
                out[key] = ("type", f"{key}: expected {_type_name(tp)}, got {type(value).__name__} {value!r}")
        return list(out.values())

    @staticmethod
    def raise_problems(problems: list[str], source: str = "") -> None:
        """Raise one :class:`ConfigError` for ``problems`` (none: return)."""
        if problems:
            prefix = f"{source}: " if source else ""
            if len(problems) == 1:
                raise ConfigError(prefix + problems[0])
            listed = "\n".join(f"  - {p}" for p in problems)
            raise ConfigError(f"{prefix}{len(problems)} configuration problems:\n{listed}")

    def _parse(self, data: Mapping[str, Any]) -> tuple[BaseModel | None, list[tuple[str, str]]]:
        """The config of ``data`` (None when a key or type is wrong) and its problems."""
        try:
            return self.root.model_validate(data), []
        except ValidationError as exc:
            problems = self._describe(exc.errors())
        if any(kind != "value" for kind, _ in problems):
            return None, problems
        # only values out of range: build it unchecked so the cross-field checks can report their problems too
        parts = {k: ([self.sections[k].model_construct(**r) for r in v] if k in self.list_sections
                     else self.sections[k].model_construct(**v)) for k, v in data.items()}
        return self.root.model_construct(**parts), problems

    # ------------------------------------------------------------------------------------------ building configs
    def config_from_dict(self, data: Mapping[str, Any]) -> Any:
        """A config from nested plain data (missing keys take their defaults); ranges are checked, cross-field
        constraints are not (:meth:`validate_config`)."""
        config, problems = self._parse(data)
        self.raise_problems([msg for _, msg in problems])
        return config

    @staticmethod
    def config_to_dict(config: BaseModel) -> dict[str, Any]:
        """Nested plain data of ``config`` (unset optional settings left out, as in the TOML)."""
        return config.model_dump(exclude_none=True)

    def _read_file(self, path: Path) -> dict[str, Any]:
        """One TOML / YAML file, its keys and value types checked (errors name the file)."""
        if not path.is_file():
            raise ConfigError(f"config file {str(path)!r} does not exist")
        yaml_file = path.suffix.lower() in (".yaml", ".yml")
        try:
            if yaml_file:
                import yaml

                data = yaml.safe_load(path.read_text(encoding="utf-8")) or {}
            else:
                data = tomllib.loads(path.read_text(encoding="utf-8"))
        except Exception as exc:  # tomllib.TOMLDecodeError, yaml.YAMLError
            raise ConfigError(f"{path}: invalid {'YAML' if yaml_file else 'TOML'}: {exc}") from exc
        if not isinstance(data, dict):
            raise ConfigError(f"{path}: the top level must be a table of sections")
        self.raise_problems([msg for kind, msg in self._parse(data)[1] if kind != "value"], str(path))
        return data

    def _resolve_config_path(self, item: str | os.PathLike[str]) -> Path:
        path = Path(item)
        if not path.exists() and not path.suffix and str(item) in self.list_presets():
            return self.preset_path(str(item))
        return path

    def apply_overrides(self, data: dict[str, Any], overrides: Iterable[str]) -> dict[str, Any]:
        """Apply ``section.key=value`` overrides to nested plain data (returns a new dict)."""
        data = _merge({}, data)
        for text in overrides:
            key, value, raw = parse_override(text)
            path = key.split(".")
            if path[0] not in self.sections:
                raise ConfigError(f"unknown key {key!r}{self._suggest(None, path[0])}")
            listed = path[0] in self.list_sections
            if listed and len(path) > 1:
                section = path[0]
                if not path[1].isdigit():
                    raise ConfigError(f"{key!r}: {section} tables are addressed as {section}.<index>.<key>, "
                                      f"e.g. {section}.0.{next(iter(self.sections[section].model_fields))}")
                default = [r.model_dump() for r in getattr(self.root(), section)]
                tables = data.setdefault(section, default)
                index = int(path[1])
                if not isinstance(tables, list) or index > len(tables):
                    raise ConfigError(f"{key!r}: {section} has {len(tables)} entries; use an index up to "
                                      f"{len(tables)} ({len(tables)} appends a new entry)")
                if index == len(tables):
                    tables.append({})
                if len(path) == 2:
                    if not isinstance(value, Mapping):
                        first = next(iter(self.sections[section].model_fields))
                        raise ConfigError(f"{key}: expected a table such as {{{first} = \"...\"}}, got {raw!r}")
                    tables[index] = dict(value)
                    continue
                target, name = tables[index], path[2]
            elif len(path) == 1:
                target, name = data, path[0]
            else:
                target, name = data.setdefault(path[0], {}), path[1]
                if not isinstance(target, dict):
                    raise ConfigError(f"{path[0]}: expected a table, got {type(target).__name__}")
            if len(path) > 1:
                spec = self.setting_spec(key)  # unknown key -> ConfigError with a suggestion
                if len(path) > (3 if listed else 2):
                    raise ConfigError(f"unknown key {key!r}; did you mean {spec.key!r}?")
                if spec.type is str and not isinstance(value, str):
                    value = raw  # e.g. model.path=2024 or output_dir=runs/1e-4: keep the text
            target[name] = value
        return data

    def load_config(self, paths: Sequence[str | os.PathLike[str]] = (), overrides: Sequence[str] = (), *,
                    validate: bool = True, **check_options: Any) -> Any:
        """Load, merge, override, type-check and validate a configuration.

        Args:
            paths: TOML / YAML files or preset names, in order (later wins). None of them = the defaults.
            overrides: ``"section.key=value"`` strings, applied after the files, in order.
            validate: check ranges and cross-field constraints (False: only keys and types).
            check_options: passed to the command's cross checks.

        Raises:
            ConfigError: every problem found (unknown keys with the closest valid key, wrong types, invalid values).
        """
        data: dict[str, Any] = {}
        for item in paths:
            data = _merge(data, self._read_file(self._resolve_config_path(item)))
        data = self.apply_overrides(data, overrides)
        config, problems = self._parse(data)
        if not validate:
            self.raise_problems([msg for kind, msg in problems if kind != "value"])
            return config
        if config is not None and self.cross_checks is not None:
            problems += [("value", p) for p in self.cross_checks(config, **check_options)]
        self.raise_problems([msg for _, msg in problems])
        return config

    def validate_config(self, config: BaseModel, **check_options: Any) -> None:
        """Check ranges and cross-field constraints of a built config; raise one ConfigError listing every problem."""
        checked, problems = self._parse(config.model_dump(exclude_none=True, warnings=False))
        cross = (self.cross_checks(checked, **check_options)
                 if checked is not None and self.cross_checks is not None else [])
        self.raise_problems([msg for _, msg in problems] + cross)

    # ---------------------------------------------------------------------------------- help, TOML, presets
    def to_toml(self, config: BaseModel, *, comments: bool = True) -> str:
        """The resolved configuration as TOML (tomli-w); :meth:`load_config` of it gives an equal config."""
        text = tomli_w.dumps(self.config_to_dict(config))
        return (f"# {self.title} (resolved; {self.program} --help explains every key)\n" + text) if comments else text

    def config_hash(self, config: BaseModel) -> str:
        """SHA-256 (hex) of the comment-free TOML of ``config``: equal configs give equal hashes."""
        return hashlib.sha256(self.to_toml(config, comments=False).encode("utf-8")).hexdigest()

    def format_help(self) -> str:
        """Every key with its default, type, range, accepted names and help, by section (``--help``)."""
        out = ["Configuration keys (set them in a TOML file or with --set section.key=value):", ""]
        for section, cls in self.sections.items():
            if section in self.list_sections:
                default = self.list_defaults.get(section) or self.root.model_fields[section].description or ""
                out.append(f"[[{section}]]  (list of tables; override one with --set {section}.0.key=value"
                           + (f", default: {default})" if default else ")"))
            else:
                out.append(f"[{section}]  {(cls.__doc__ or '').split(':', 1)[-1].strip()}")
            for name in cls.model_fields:
                spec = self.setting_spec(f"{section}.{name}")
                required = section in self.list_sections and name == "name" and spec.default == ""
                shown = ("(required)" if required else "(unset)" if spec.default is None
                         else json.dumps(spec.default))
                out.append(f"  {spec.key} = {shown}    [{_type_name(spec.annotation)}]")
                rng = _range_text(spec)
                out.append(f"      {spec.help}" + (f"; range {rng}" if rng else "")
                           + (f" (one of: {', '.join(spec.choices)})" if spec.choices else ""))
            out.append("")
        out.append(f"Presets (use as a config file name): {', '.join(self.list_presets()) or '(none)'}")
        return "\n".join(out) + "\n"

    def list_presets(self) -> list[str]:
        """Names of the shipped presets (``<preset_dir>/<name>.toml``), sorted."""
        return sorted(p.stem for p in self.preset_dir.glob("*.toml"))

    def preset_path(self, name: str) -> Path:
        """Path of a shipped preset by name (``.toml`` optional); ConfigError listing the presets otherwise."""
        stem = name[:-5] if name.endswith(".toml") else name
        available = self.list_presets()
        if stem not in available:
            close = difflib.get_close_matches(stem, available, n=1, cutoff=0.5)
            raise ConfigError(f"unknown preset {name!r}; available: {', '.join(available)}"
                              + (f" (did you mean {close[0]!r}?)" if close else ""))
        return self.preset_dir / f"{stem}.toml"

    def check_config_args(self, items: Sequence[str]) -> None:
        """``--config`` items that are neither a file nor a preset: a ConfigError listing the presets."""
        presets = self.list_presets()
        for item in items:
            if not Path(item).expanduser().exists() and not Path(item).suffix and item not in presets:
                close = difflib.get_close_matches(item, presets, n=1, cutoff=0.5)
                raise ConfigError(f"--config {item!r} is neither a config file nor a preset; presets: "
                                  f"{', '.join(presets)}" + (f" (did you mean {close[0]!r}?)" if close else ""))

    # -------------------------------------------------------------------------------------------- command line
    def argument_parser(self, description: str, *, set_example: str) -> argparse.ArgumentParser:
        """The command's parser with the options every settings-driven command shares: ``--config`` (files or
        presets, repeatable), ``--set`` (``set_example`` shows one), ``--print-config``, ``--list-presets``,
        ``--debug``; ``--help`` ends with every key (:meth:`format_help`). Commands add their own options."""
        parser = argparse.ArgumentParser(prog=self.program, description=description, epilog=self.format_help(),
                                         formatter_class=argparse.RawDescriptionHelpFormatter)
        parser.add_argument("--config", "-c", action="append", default=[], metavar="FILE",
                            help="TOML/YAML config file or preset name; repeat to merge (later wins)")
        parser.add_argument("--set", "-s", action="append", default=[], metavar="KEY=VALUE", dest="overrides",
                            help=f"override one key, e.g. {set_example}")
        parser.add_argument("--print-config", action="store_true",
                            help="print the resolved configuration as TOML and exit")
        parser.add_argument("--list-presets", action="store_true", help="list the shipped presets and exit")
        parser.add_argument("--debug", action="store_true",
                            help="show the traceback of errors too (or set RDT_DEBUG=1)")
        return parser
