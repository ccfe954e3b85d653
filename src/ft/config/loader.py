"""Resolve train.yml: defaults < train.yml < FT_* environment < --set, remembering where each value came from.

Every problem is collected and reported at once, each naming its origin (file and line, environment
variable or --set), the key, the value and what is allowed.
"""

from __future__ import annotations

import difflib
import logging
import os
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal, get_args, get_origin

import annotated_types as at
import yaml
from pydantic import BaseModel, ValidationError

from ft.config.train import SECTIONS, TrainConfig
from ft.errors import ErrorCode, FtError

log = logging.getLogger(__name__)

ENV_PREFIX = "FT_"
ENV_NESTED = "__"


@dataclass
class ResolvedConfig:
    """The validated configuration and, per dotted key, where its value came from."""

    config: TrainConfig
    sources: dict[str, str] = field(default_factory=dict)
    path: Path | None = None

    def source(self, key: str) -> str:
        return self.sources.get(key, "default")

    def flat(self) -> dict[str, Any]:
        return flatten(self.config.model_dump(mode="json"))


def flatten(d: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, Mapping):
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out


def _set_path(d: dict[str, Any], path: list[str], value: Any) -> None:
    for p in path[:-1]:
        nxt = d.get(p)
        if not isinstance(nxt, dict):
            nxt = d[p] = {}
        d = nxt
    d[path[-1]] = value


# ---------------------------------------------------------------- train.yml with line numbers
def _yaml_with_lines(text: str, origin: str) -> tuple[dict[str, Any], dict[str, int]]:
    try:
        node = yaml.compose(text, Loader=yaml.SafeLoader)
        data = yaml.safe_load(text)
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f"{origin}:{mark.line + 1}:{mark.column + 1}" if mark else origin
        problem = getattr(e, "problem", None) or str(e)
        raise FtError(
            ErrorCode.CONFIG_INVALID,
            f"{where}: not valid YAML: {problem}",
            "fix the YAML syntax at that line (indentation with spaces, 'key: value' pairs)",
        ) from None
    if data is None:
        return {}, {}
    if not isinstance(data, dict):
        raise FtError(
            ErrorCode.CONFIG_INVALID,
            f"{origin}: expected sections like 'training:' at the top level, found a {type(data).__name__}",
            "see `ft init` for a complete train.yml",
        )
    lines: dict[str, int] = {}

    def walk(n: yaml.Node, prefix: str) -> None:
        if isinstance(n, yaml.MappingNode):
            for k, v in n.value:
                key = f"{prefix}{k.value}"
                lines[key] = k.start_mark.line + 1
                walk(v, key + ".")

    walk(node, "")
    return data, lines


def _parse_scalar(raw: str) -> Any:
    """Values from the environment and --set are read as YAML scalars (1e-4, true, [q_proj, v_proj])."""
    try:
        v = yaml.safe_load(raw)
    except yaml.YAMLError:
        return raw
    if isinstance(v, str):
        try:  # YAML 1.1 reads 1e-4 as a string; a number is what anyone means.
            return float(v) if any(c in v for c in "eE.") else int(v)
        except ValueError:
            return v
    return v


def _env_overrides(environ: Mapping[str, str]) -> list[tuple[list[str], Any, str]]:
    out = []
    for name, raw in sorted(environ.items()):
        if not name.startswith(ENV_PREFIX) or ENV_NESTED not in name:
            continue
        parts = name[len(ENV_PREFIX) :].lower().split(ENV_NESTED)
        if parts[0] in SECTIONS or len(parts) == 2:
            out.append((parts, _parse_scalar(raw), f"env {name}"))
    return out


def _set_overrides(items: Iterable[str]) -> list[tuple[list[str], Any, str]]:
    out = []
    for item in items:
        key, sep, raw = item.partition("=")
        if not sep or not key.strip() or "." not in key:
            raise FtError(
                ErrorCode.USAGE,
                f"--set {item!r}: expected section.key=value",
                "for example: --set training.learning_rate=2e-4",
            )
        out.append(([p.strip() for p in key.strip().split(".")], _parse_scalar(raw), "--set"))
    return out


# ---------------------------------------------------------------- error messages
def _model_for(path: list[str]) -> tuple[type[BaseModel] | None, str | None]:
    """The pydantic model that owns the last key of ``path`` (None when the path leaves the schema)."""
    model: type[BaseModel] = TrainConfig
    for p in path[:-1]:
        f = model.model_fields.get(p)
        if f is None or not (isinstance(f.annotation, type) and issubclass(f.annotation, BaseModel)):
            return None, None
        model = f.annotation
    return model, path[-1] if path else None


def allowed_values(model: type[BaseModel], name: str) -> str:
    """A short human description of what a field accepts, from its type and constraints."""
    f = model.model_fields[name]
    parts: list[str] = []
    for m in f.metadata:
        for cls, sym in ((at.Gt, ">"), (at.Ge, "≥"), (at.Lt, "<"), (at.Le, "≤")):
            if isinstance(m, cls):
                parts.append(f"{sym} {getattr(m, next(iter(cls.__dataclass_fields__)))}")
    ann = f.annotation
    kinds: list[str] = []

    def describe(t: Any) -> None:
        origin = get_origin(t)
        if origin is Literal:
            kinds.append("one of " + ", ".join(str(a) for a in get_args(t)))
        elif origin is not None and str(origin).endswith("Annotated"):
            inner, *meta = get_args(t)
            describe(inner)
            for m in meta:
                if hasattr(m, "metadata"):
                    for mm in m.metadata:
                        for cls, sym in ((at.Gt, ">"), (at.Ge, "≥"), (at.Lt, "<"), (at.Le, "≤")):
                            if isinstance(mm, cls):
                                parts.append(f"{sym} {getattr(mm, next(iter(cls.__dataclass_fields__)))}")
        elif origin is not None and get_args(t):
            if origin is dict:
                kinds.append("a mapping of train.yml keys to {type, low, high, step, choices}")
            elif origin is list:
                kinds.append("a list of names")
            else:
                for a in get_args(t):
                    describe(a)
        elif t is type(None):
            kinds.append("null")
        elif isinstance(t, type):
            kinds.append(
                {int: "an integer", float: "a number", str: "text", bool: "true or false"}.get(t, t.__name__)
            )

    describe(ann)
    text = " or ".join(dict.fromkeys(kinds))
    if parts:
        text += " (" + ", ".join(dict.fromkeys(parts)) + ")"
    return text


def _suggest(model: type[BaseModel] | None, prefix: list[str], name: str) -> str:
    if model is None:
        return ""
    close = difflib.get_close_matches(name, list(model.model_fields), n=1, cutoff=0.6)
    return f"; did you mean {'.'.join([*prefix, close[0]])}?" if close else ""


def _dict_value_model(ann: Any) -> type[BaseModel] | None:
    """The value model of a ``dict[str, Model]`` (or ``dict[str, Model] | None``) field, else None."""
    for t in (ann, *get_args(ann)):
        if get_origin(t) is dict:
            value = get_args(t)[1]
            return value if isinstance(value, type) and issubclass(value, BaseModel) else None
    return None


def _messages(err: ValidationError, origins: dict[str, str], values: dict[str, Any]) -> list[str]:
    by_key: dict[str, list[Any]] = {}
    for e in err.errors():
        path = [str(p) for p in e["loc"] if isinstance(p, str)]
        # Drop union-branch tags pydantic puts in loc (e.g. 'literal['all']', 'int', 'constrained-int').
        keep: list[str] = []
        model: type[BaseModel] | None = TrainConfig
        mapping_of: type[BaseModel] | None = None  # set after a dict field: its next loc part is a key
        for p in path:
            if mapping_of is not None:
                keep.append(p)
                model, mapping_of = mapping_of, None
            elif model is not None and p in model.model_fields:
                keep.append(p)
                ann = model.model_fields[p].annotation
                model = ann if isinstance(ann, type) and issubclass(ann, BaseModel) else None
                mapping_of = _dict_value_model(ann)
            elif e["type"] == "extra_forbidden" and p == path[-1]:
                keep.append(p)
                break
        by_key.setdefault(".".join(keep), []).append(e)
    msgs: list[str] = []
    for key, errs in by_key.items():
        keep = key.split(".") if key else []
        origin = origins.get(key) or origins.get(".".join(keep[:1])) or "train.yml"
        owner, name = _model_for(keep)
        first = errs[0]
        if first["type"] == "extra_forbidden":
            msgs.append(f"{origin}: {key} is not a setting{_suggest(owner, keep[:-1], name or '')}")
        elif owner is not None and name in owner.model_fields and key in values:
            # One error per union branch is noise; a single non-literal error says something useful.
            why = f": {first['msg']}" if len(errs) == 1 and first["type"] != "literal_error" else ""
            msgs.append(
                f"{origin}: {key} = {values[key]!r} is not allowed{why}; allowed: {allowed_values(owner, name)}"
            )
        else:
            msgs.append(f"{origin}: {key or 'train.yml'}: {first['msg'].removeprefix('Value error, ')}")
    return msgs


# ---------------------------------------------------------------- entry point
def load_config(
    workspace_or_file: Any = None,
    overrides: Iterable[str] = (),
    *,
    environ: Mapping[str, str] | None = None,
    base: dict[str, Any] | None = None,
) -> ResolvedConfig:
    """Resolve the configuration of a workspace (or a train.yml path; None = defaults only)."""
    environ = os.environ if environ is None else environ
    path: Path | None = None
    if workspace_or_file is not None:
        p = Path(getattr(workspace_or_file, "train_yml", workspace_or_file))
        path = p / "train.yml" if p.is_dir() else p
    data: dict[str, Any] = dict(base or {})
    origins: dict[str, str] = {}
    if path is not None:
        if not path.is_file():
            raise FtError(ErrorCode.CONFIG_MISSING, f"{path} does not exist", "create it with `ft init`")
        try:
            text = path.read_text(encoding="utf-8")
        except UnicodeDecodeError as e:
            raise FtError(
                ErrorCode.CONFIG_INVALID, f"{path}: not UTF-8 text ({e.reason})", "save it as UTF-8"
            ) from None
        data, lines = _yaml_with_lines(text, path.name)
        origins = {k: f"{path.name}:{line}" for k, line in lines.items()}
    layered = [*_env_overrides(environ), *_set_overrides(overrides)]
    for parts, value, origin in layered:
        _set_path(data, parts, value)
        origins[".".join(parts)] = origin
    if "output" in data:
        # output.dir (removed) was never read: runs are always in <workspace>/runs. An old train.yml or run
        # snapshot keeps working; the section is dropped with a word instead of being silently ignored.
        data = {k: v for k, v in data.items() if k != "output"}
        log.warning(
            "the output section is no longer a setting (runs are always in <workspace>/runs): remove it"
        )
    values = flatten(data)
    try:
        cfg = TrainConfig.model_validate(data)
    except ValidationError as e:
        msgs = _messages(e, origins, values)
        raise FtError(
            ErrorCode.CONFIG_INVALID,
            "invalid configuration:\n  " + "\n  ".join(msgs) if len(msgs) > 1 else msgs[0],
            "fix the value(s) named above; `ft config show` prints every setting with its source, docs/config.md lists them",
        ) from None
    # Line numbers are not part of a value's source once it has a leaf key; report file:line for set keys.
    sources = {k: v for k, v in origins.items() if k in values}
    return ResolvedConfig(config=cfg, sources=sources, path=path)
