"""ft's tool fallback written as one Jinja chat template, for exports.

For a model whose chat template cannot render tool calls (the embedded SmolLM2's), ft trains on its
fallback (:func:`ft.data.templates.fallback_messages`): the tool list at the end of the system turn, each
call as ``<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>`` in the assistant turn, tool results
as a user turn of ``<tool_response>`` blocks, all rendered through the model's own template. An exported
model must render prompts the same way, so :func:`fallback_template` builds one template that does the same
transformation in Jinja and then runs the model's template on the result. It is what `ft export` writes as
``tokenizer.chat_template`` into a GGUF (llama.cpp ``--jinja``, llama-cpp-python) and into the HF/MLX
folders of a model tuned on tool data; tests check that it renders exactly as ft does.

Function arguments may be a JSON object (as ft stores them) or a JSON string (as OpenAI clients send them);
both render the same when the string is compact JSON as ``json.dumps`` writes it.
"""

from __future__ import annotations

import json

from ft.data.templates import FALLBACK_TOOLS_HEADER

MARKER = "{#- ft tool fallback: tools in the system turn, calls as <tool_call>{json}</tool_call> -#}"


def _lit(text: str) -> str:
    """A Jinja string literal for ``text`` (JSON's escapes are Jinja's)."""
    return json.dumps(text, ensure_ascii=True)


def fallback_template(model_template: str) -> str:
    """A chat template that renders tool data as ft's fallback does, then ``model_template`` on the result."""
    head, tail = FALLBACK_TOOLS_HEADER.replace("{{", "\x00").replace("}}", "\x01").split("{tools}")
    head, tail = (s.replace("\x00", "{").replace("\x01", "}") for s in (head, tail))
    preamble = (
        MARKER + "{%- set ns = namespace(out=[], tool=false, listing='', calls='') -%}"
        "{%- set rest = messages -%}"
        "{%- if tools -%}"
        "{%- for t in tools -%}{%- set ns.listing = ns.listing ~ ('\\n' if not loop.first else '') ~ (t | tojson) -%}"
        "{%- endfor -%}"
        "{%- set listing = " + _lit(head) + " ~ ns.listing ~ " + _lit(tail) + " -%}"
        "{%- if messages and messages[0]['role'] == 'system' -%}"
        "{%- set ns.out = [{'role': 'system', 'content': messages[0]['content'] ~ '\\n\\n' ~ listing}] -%}"
        "{%- set rest = messages[1:] -%}"
        "{%- else -%}{%- set ns.out = [{'role': 'system', 'content': listing}] -%}{%- endif -%}"
        "{%- endif -%}"
        "{%- for m in rest -%}"
        "{%- if m['role'] == 'tool' -%}"
        "{%- set block = '<tool_response>\\n' ~ m['content'] ~ '\\n</tool_response>' -%}"
        "{%- if ns.tool -%}"
        "{%- set ns.out = ns.out[:-1] + [{'role': 'user', 'content': ns.out[-1]['content'] ~ '\\n' ~ block}] -%}"
        "{%- else -%}{%- set ns.out = ns.out + [{'role': 'user', 'content': block}] -%}{%- endif -%}"
        "{%- set ns.tool = true -%}"
        "{%- else -%}"
        "{%- set ns.tool = false -%}"
        "{%- if m['role'] == 'assistant' and m['tool_calls'] -%}"
        "{%- set ns.calls = '' -%}"
        "{%- for c in m['tool_calls'] -%}"
        "{%- set f = c['function'] if c['function'] is defined else c -%}"
        "{%- set args = f['arguments'] if f['arguments'] is string else (f['arguments'] | tojson) -%}"
        "{%- set ns.calls = ns.calls ~ ('\\n' if not loop.first else '') ~ '<tool_call>\\n{\"name\": ' "
        "~ (f['name'] | tojson) ~ ', \"arguments\": ' ~ args ~ '}\\n</tool_call>' -%}"
        "{%- endfor -%}"
        "{%- set ns.out = ns.out + [{'role': 'assistant', 'content': (m['content'] ~ '\\n' ~ ns.calls) "
        "if m['content'] else ns.calls}] -%}"
        "{%- else -%}{%- set ns.out = ns.out + [{'role': m['role'], 'content': m['content']}] -%}{%- endif -%}"
        "{%- endif -%}"
        "{%- endfor -%}"
        "{%- set messages = ns.out -%}{%- set tools = none %}"
    )
    return preamble + model_template


def is_fallback_template(source: str | None) -> bool:
    return bool(source) and source.startswith(MARKER)  # type: ignore[union-attr]
