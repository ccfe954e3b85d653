"""An Ollama ``Modelfile`` beside a GGUF: FROM, TEMPLATE (Go template syntax), SYSTEM, stop tokens, parameters.

Ollama's templates are Go templates, not Jinja, so a model's Jinja chat template cannot be carried over
verbatim. We recognise the common families by their markers (ChatML, Llama 3, Mistral/Llama 2 [INST])
and write Ollama's equivalent; for anything else TEMPLATE is left out and Ollama falls back to the
chat template stored inside the GGUF (``tokenizer.chat_template``), which it reads on import.

A ChatML model tuned on tool calls through ft's fallback (:mod:`ft.data.tool_template`) gets a TEMPLATE
that writes tools, calls and results the same way (``.Tools`` in the system turn, ``<tool_call>`` blocks,
``<tool_response>`` user turns), so Ollama's tool calling works with it. Ollama prints tool definitions and
arguments as compact JSON (no spaces after ``:`` and ``,``), where training used ``json.dumps``' spacing.
"""

from __future__ import annotations

import json
from typing import Any

_CHATML = """{{- if .System }}<|im_start|>system
{{ .System }}<|im_end|>
{{ end }}
{{- range .Messages }}<|im_start|>{{ .Role }}
{{ .Content }}<|im_end|>
{{ end }}<|im_start|>assistant
"""

_LLAMA3 = """{{- if .System }}<|start_header_id|>system<|end_header_id|>

{{ .System }}<|eot_id|>
{{- end }}
{{- range .Messages }}<|start_header_id|>{{ .Role }}<|end_header_id|>

{{ .Content }}<|eot_id|>
{{- end }}<|start_header_id|>assistant<|end_header_id|>

"""

_INST = """{{- range $i, $m := .Messages }}
{{- if eq $m.Role "user" }}[INST] {{ if and (eq $i 0) $.System }}{{ $.System }}

{{ end }}{{ $m.Content }} [/INST]
{{- else if eq $m.Role "assistant" }} {{ $m.Content }}</s>
{{- end }}
{{- end }}"""


# ft's tool fallback (ft.data.tool_template) over ChatML, in Ollama's Go template language.
_CHATML_TOOLS = """{{- if or .System .Tools }}<|im_start|>system
{{- if .System }}
{{ .System }}
{{- end }}
{{- if .Tools }}
{{- if .System }}

{{ else }}
{{ end }}# Tools

You can call the functions below, described as JSON schemas:
<tools>
{{- range .Tools }}
{{ . }}
{{- end }}
</tools>

To call one, answer with a JSON object inside <tool_call></tool_call> tags, one per call:
<tool_call>
{"name": "<function name>", "arguments": {<arguments as a JSON object>}}
</tool_call>
{{- end }}<|im_end|>
{{ end }}
{{- $tool := false }}
{{- range .Messages }}
{{- if eq .Role "tool" }}
{{- if $tool }}
<tool_response>
{{ .Content }}
</tool_response>
{{- else }}<|im_start|>user
<tool_response>
{{ .Content }}
</tool_response>
{{- end }}
{{- $tool = true }}
{{- else }}
{{- if $tool }}<|im_end|>
{{ end }}
{{- $tool = false }}<|im_start|>{{ .Role }}
{{ if .Content }}{{ .Content }}{{ if .ToolCalls }}
{{ end }}{{ end }}
{{- range $i, $c := .ToolCalls }}{{ if $i }}
{{ end }}<tool_call>
{"name": "{{ $c.Function.Name }}", "arguments": {{ $c.Function.Arguments }}}
</tool_call>
{{- end }}<|im_end|>
{{ end }}
{{- end }}
{{- if $tool }}<|im_end|>
{{ end }}<|im_start|>assistant
"""


def template_family(chat_template: str | None) -> str | None:
    if not chat_template:
        return None
    if "<|im_start|>" in chat_template:
        return "chatml"
    if "<|start_header_id|>" in chat_template:
        return "llama3"
    if "[INST]" in chat_template:
        return "inst"
    return None


def default_system_prompt(chat_template: str, family: str) -> str | None:
    """The system prompt a template inserts when the conversation has none (SmolLM2 has one)."""
    if family != "chatml":
        return None
    try:
        import jinja2

        env = jinja2.Environment(autoescape=False)  # noqa: S701 - a prompt template, not HTML
        text = env.from_string(chat_template).render(
            messages=[{"role": "user", "content": "x"}],
            add_generation_prompt=False,
            bos_token="",
            eos_token="",
        )
    except Exception:  # a template we cannot render here: Ollama keeps whatever it reads from the GGUF
        return None
    start = "<|im_start|>system\n"
    if start in text:
        return text.split(start, 1)[1].split("<|im_end|>", 1)[0]
    return None


def modelfile(
    gguf_name: str,
    chat_template: str | None,
    stop: list[str],
    *,
    context_length: int,
    extra: dict[str, Any] | None = None,
    tool_fallback: bool = False,
) -> str:
    """The text of an Ollama Modelfile whose FROM is ``./<gguf_name>`` (kept beside it).

    ``tool_fallback``: ``chat_template`` is ft's tool fallback over the model's template (see above)."""
    family = template_family(chat_template)
    lines = [
        "# Ollama Modelfile written by `ft export`. Create the model with:",
        f"#   ollama create my-model -f {'Modelfile'}",
        f"FROM ./{gguf_name}",
        "",
    ]
    if family:
        template = {"chatml": _CHATML, "llama3": _LLAMA3, "inst": _INST}[family]
        if family == "chatml" and tool_fallback:
            template = _CHATML_TOOLS
        lines.append(f'TEMPLATE """{template}"""')
        system = default_system_prompt(chat_template or "", family)
        if system:
            lines.append(f"SYSTEM {json.dumps(system)}")
    else:
        lines.append("# TEMPLATE: not written; Ollama uses the chat template stored in the GGUF file")
    lines.append("")
    for token in stop:
        lines.append(f"PARAMETER stop {json.dumps(token)}")
    lines.append(f"PARAMETER num_ctx {min(int(context_length), 4096)}")
    for key, value in (extra or {}).items():
        lines.append(f"PARAMETER {key} {value}")
    return "\n".join(lines) + "\n"
