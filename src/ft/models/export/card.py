"""The model card (README.md with YAML metadata) uploaded beside an export by ``ft export --push``.

Written from facts the service gathers (run settings, data, evaluation, export checks); this module only
formats them. It never receives a local path: a card says how to run the model from the Hub repository.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import yaml

LIBRARY = {"gguf": "gguf", "mlx": "mlx", "hf": "transformers", "peft": "peft"}


@dataclass
class CardFacts:
    repo_id: str
    fmt: str
    quant: str
    base_model: str  # a Hub repo id when known, else ft's model name
    base_is_hub_id: bool
    license: str | None
    method: str | None
    main_file: str | None  # the .gguf file name (gguf exports)
    run_id: str | None = None
    checkpoint: str | None = None
    hyperparameters: dict[str, Any] = field(default_factory=dict)
    data: dict[str, Any] = field(default_factory=dict)  # name, version, records per split, tokens
    datasets: list[str] = field(default_factory=list)  # Hub dataset ids only
    evaluation: dict[str, Any] | None = None  # {"split", "base": {...}, "tuned": {...}}
    checks: list[dict[str, Any]] = field(default_factory=list)
    tune_kept: float | None = None
    drift_allowed: bool = False
    ft_version: str = ""


def _num(v: Any) -> str:
    if isinstance(v, float):
        return f"{v:.4g}"
    return str(v)


def model_card(f: CardFacts) -> str:
    meta: dict[str, Any] = {"library_name": LIBRARY[f.fmt], "pipeline_tag": "text-generation"}
    if f.base_is_hub_id:
        meta["base_model"] = f.base_model
    meta["license"] = f.license or "other"
    tags = ["ft", f.fmt]
    if f.method:
        tags.append(f.method)
    if f.fmt == "gguf":
        tags.append(f.quant)
    meta["tags"] = tags
    if f.datasets:
        meta["datasets"] = list(f.datasets)
    name = f.repo_id.split("/")[-1]
    out = ["---", yaml.safe_dump(meta, sort_keys=False).strip(), "---", "", f"# {name}", ""]
    what = f"a {f.method.upper()} fine-tune of `{f.base_model}`" if f.method else f"`{f.base_model}`"
    out.append(
        f"This is {what}, trained and exported with [ft](https://pypi.org/project/ft/) {f.ft_version} "
        f"as **{f.fmt}** ({f.quant})."
        + ("" if f.license else " The license is the base model's: see its repository.")
    )
    if f.drift_allowed and f.tune_kept is not None:
        out += [
            "",
            f"> **Note:** this {f.quant} file keeps only {f.tune_kept:.1%} of the fine-tune's effect on the "
            "logits, below what ft requires at this precision; it was written with `--allow-drift`.",
        ]
    if f.data:
        out += ["", "## Training data", ""]
        out += [f"- {k}: {_num(v)}" for k, v in f.data.items()]
    if f.hyperparameters:
        out += ["", "## Training settings", "", "| setting | value |", "| --- | --- |"]
        out += [f"| {k} | {_num(v)} |" for k, v in f.hyperparameters.items()]
    if f.evaluation:
        ev = f.evaluation
        out += [
            "",
            "## Evaluation",
            "",
            f"On the `{ev.get('split')}` split ({ev.get('records')} records):",
            "",
        ]
        out += ["| model | loss | perplexity | next-token accuracy |", "| --- | --- | --- | --- |"]
        for who in ("base", "tuned"):
            m = ev.get(who)
            if m:
                out.append(f"| {who} | {m['loss']:.4f} | {m['perplexity']:.3f} | {m['accuracy']:.1%} |")
    if f.checks:
        out += ["", "## Export checks", "", "Read back and compared with the MLX model before upload:", ""]
        out += [f"- {'ok' if c['ok'] else 'FAILED'} **{c['name']}**: {c['detail']}" for c in f.checks]
    out += ["", "## How to run it", ""] + _usage(f)
    return "\n".join(out) + "\n"


def _usage(f: CardFacts) -> list[str]:
    r = f.repo_id
    if f.fmt == "gguf":
        tag = f.quant.upper()
        return [
            "llama.cpp:",
            "",
            "```sh",
            f"llama-cli -hf {r}:{tag} -cnv",
            f"llama-server -hf {r}:{tag}",
            "```",
            "",
            "Ollama (the repository's `Modelfile` carries the chat template, stop tokens and system prompt):",
            "",
            "```sh",
            f"ollama run hf.co/{r}:{tag}",
            "```",
        ]
    if f.fmt == "mlx":
        return ["mlx-lm:", "", "```sh", f"mlx_lm.generate --model {r} --prompt 'Hello'", "```"]
    if f.fmt == "hf":
        return [
            "transformers:",
            "",
            "```python",
            "from transformers import AutoModelForCausalLM, AutoTokenizer",
            f'model = AutoModelForCausalLM.from_pretrained("{r}")',
            f'tokenizer = AutoTokenizer.from_pretrained("{r}")',
            "```",
            "",
            "mlx-lm reads the same folder:",
            "",
            "```sh",
            f"mlx_lm.generate --model {r} --prompt 'Hello'",
            "```",
        ]
    return [
        "PEFT (the adapter on its base model):",
        "",
        "```python",
        "from peft import PeftModel",
        "from transformers import AutoModelForCausalLM",
        f'base = AutoModelForCausalLM.from_pretrained("{f.base_model}")',
        f'model = PeftModel.from_pretrained(base, "{r}")',
        "```",
    ]
