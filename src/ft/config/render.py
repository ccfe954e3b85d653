"""Render train.yml (every key, commented) and docs/config.md from the pydantic models."""

from __future__ import annotations

from typing import Any

import yaml
from pydantic import BaseModel

from ft.config.loader import allowed_values
from ft.config.profiles import PROFILE_HELP, PROFILES
from ft.config.train import BRIEF_MODEL, TrainConfig


def profile_config(profile: str) -> TrainConfig:
    """The defaults with a profile's differences applied."""
    data: dict[str, Any] = {}
    for section, values in PROFILES[profile].items():
        data.setdefault(section, {}).update(values)
    return TrainConfig.model_validate(data)


def _yaml_value(v: Any) -> str:
    text = yaml.safe_dump(v, default_flow_style=True, sort_keys=False).strip()
    return text.removesuffix("\n...").removesuffix("...").strip()


def render_train_yml(cfg: TrainConfig, profile: str = "chat") -> str:
    lines = [
        f"# train.yml: every ft setting, with its default (profile: {profile}: {PROFILE_HELP[profile]}).",
        "# Precedence: these values < FT_SECTION__KEY environment variables < `--set section.key=value`.",
        "# `ft config show` prints the resolved values and where each came from; docs/config.md explains each key.",
        "",
    ]
    for section, sfield in TrainConfig.model_fields.items():
        model: type[BaseModel] = sfield.annotation  # type: ignore[assignment]
        lines.append(f"# {sfield.description}")
        lines.append(f"{section}:")
        values = getattr(cfg, section)
        for name, f in model.model_fields.items():
            lines.append(f"  # {f.description} Allowed: {allowed_values(model, name)}.")
            lines.append(f"  {name}: {_yaml_value(getattr(values, name))}")
            if section == "model" and name == "name":
                lines.append(
                    f"  # name: {BRIEF_MODEL}   # the brief's target; on 24 GB pull it with --quantize 4"
                )
        lines.append("")
    return "\n".join(lines)


def config_reference_markdown() -> str:
    """docs/config.md; a test keeps the file equal to this."""
    out = [
        "# Configuration reference (train.yml)",
        "",
        "Generated from `src/ft/config/train.py` by `python -m ft.config.render > docs/config.md`;",
        "a test fails when this file and the code disagree.",
        "",
        "Precedence, lowest first: defaults < `train.yml` < environment `FT_SECTION__KEY=value`",
        "(e.g. `FT_TRAINING__LEARNING_RATE=2e-4`) < `--set section.key=value` on the command line.",
        "`ft config show` prints every resolved value with its source.",
        "",
    ]
    for section, sfield in TrainConfig.model_fields.items():
        model: type[BaseModel] = sfield.annotation  # type: ignore[assignment]
        out += [
            f"## `{section}`",
            "",
            str(sfield.description),
            "",
            "| key | default | allowed | meaning |",
            "|---|---|---|---|",
        ]
        for name, f in model.model_fields.items():
            default = _yaml_value(f.get_default(call_default_factory=True))
            out.append(
                f"| `{section}.{name}` | `{default}` | {allowed_values(model, name)} | {f.description} |"
            )
        out.append("")
    out += ["## Profiles (`ft init --profile NAME`)", "", "Each profile changes only these values:", ""]
    for name, diff in PROFILES.items():
        changes = ", ".join(f"`{s}.{k}: {_yaml_value(v)}`" for s, kv in diff.items() for k, v in kv.items())
        out.append(f"- **{name}** ({PROFILE_HELP[name]}): {changes or 'the defaults'}")
    out.append("")
    return "\n".join(out)


if __name__ == "__main__":
    print(config_reference_markdown(), end="")
