"""The Config page's view of train.yml: every key of the schema with its docs, default, value and source,
and a save that changes only the lines of the keys changed (comments and the other lines stay as they are).

train.yml is the two-level file `ft init` writes (``section:`` then ``  key: value`` lines). A key set to a
new value has its value replaced in place (a trailing ``# comment`` kept); a key not in the file yet is
added at the end of its section. The whole result is validated by the same loader as `ft train` before it
is written (atomically), so an invalid value is refused with its key and nothing is written.
"""

from __future__ import annotations

import re
from typing import Any

import yaml
from pydantic import BaseModel

from ft.config.loader import allowed_values, load_config
from ft.config.train import TrainConfig
from ft.errors import ErrorCode, FtError
from ft.workspace import Workspace
from ft.workspace.atomic import atomic_write_text


class ConfigField(BaseModel):
    key: str
    section: str
    doc: str
    allowed: str
    default: Any
    value: Any
    source: str


class ConfigSchema(BaseModel):
    path: str | None
    fields: list[ConfigField]


class ConfigSaved(BaseModel):
    path: str
    changed: list[str]


def _yaml_value(v: Any) -> str:
    text = yaml.safe_dump(v, default_flow_style=True, sort_keys=False).strip()
    return text.removesuffix("\n...").removesuffix("...").strip()


def config_schema(ws: Workspace) -> ConfigSchema:
    resolved = load_config(ws)
    defaults = TrainConfig()
    fields = []
    for section, sfield in TrainConfig.model_fields.items():
        model: type[BaseModel] = sfield.annotation  # type: ignore[assignment]
        values, dvalues = getattr(resolved.config, section), getattr(defaults, section)
        for name, f in model.model_fields.items():
            key = f"{section}.{name}"
            fields.append(
                ConfigField(
                    key=key,
                    section=section,
                    doc=f.description or "",
                    allowed=allowed_values(model, name),
                    default=_plain(getattr(dvalues, name)),
                    value=_plain(getattr(values, name)),
                    source=resolved.source(key),
                )
            )
    return ConfigSchema(path=str(resolved.path) if resolved.path else None, fields=fields)


def _plain(v: Any) -> Any:
    return v.model_dump(mode="json") if isinstance(v, BaseModel) else yaml.safe_load(_yaml_value(v))


def _set_line(lines: list[str], section: str, key: str, value: str) -> list[str]:
    """``lines`` with ``section.key`` set to the YAML text ``value``."""
    sec_re = re.compile(rf"^{re.escape(section)}:\s*(#.*)?$")
    key_re = re.compile(rf"^(\s+){re.escape(key)}:(\s*)([^#]*?)(\s+#.*)?$")
    start = next((i for i, line in enumerate(lines) if sec_re.match(line)), None)
    if start is None:
        return [*lines, f"{section}:", f"  {key}: {value}"]
    end = start + 1
    while end < len(lines) and (not lines[end].strip() or lines[end][:1] in (" ", "\t", "#")):
        m = key_re.match(lines[end])
        if m:
            out = list(lines)
            out[end] = f"{m.group(1)}{key}: {value}{m.group(4) or ''}"
            return out
        end += 1
    last = end
    while last > start + 1 and not lines[last - 1].strip():
        last -= 1
    return [*lines[:last], f"  {key}: {value}", *lines[last:]]


def save_config(ws: Workspace, values: dict[str, Any]) -> ConfigSaved:
    """Set ``values`` (dotted key -> value) in train.yml, keeping everything else; validated first."""
    path = ws.train_yml
    if not path.is_file():
        raise FtError(ErrorCode.CONFIG_MISSING, f"{path} does not exist", "create it with `ft init`")
    text = path.read_text(encoding="utf-8")
    lines = text.split("\n")
    changed = []
    current = load_config(ws).flat()
    for key, value in values.items():
        section, _, name = key.partition(".")
        if not name or "." in name or section not in TrainConfig.model_fields:
            raise FtError(ErrorCode.CONFIG_INVALID, f"{key}: unknown setting", "see docs/config.md")
        if current.get(key) == value:
            continue
        lines = _set_line(lines, section, name, _yaml_value(value))
        changed.append(key)
    new = "\n".join(lines)
    tmp = ws.root / ".train.yml.check"
    try:  # the loader reads files: check the new text through it before replacing train.yml
        atomic_write_text(tmp, new)
        load_config(tmp, environ={})
    finally:
        tmp.unlink(missing_ok=True)
    if changed:
        atomic_write_text(path, new)
    return ConfigSaved(path=str(path), changed=changed)


def field_errors(message: str) -> dict[str, str]:
    """The loader's message split per dotted key (each problem line starts with its key or source)."""
    out: dict[str, str] = {}
    keys = {f"{s}.{n}" for s, sf in TrainConfig.model_fields.items() for n in sf.annotation.model_fields}  # type: ignore[union-attr]
    for line in message.splitlines():
        for k in keys:
            if re.search(rf"(?<![\w.]){re.escape(k)}(?![\w])", line):
                out[k] = line.strip()
    return out
