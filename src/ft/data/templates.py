"""Chat templates: the model's own Jinja template, or a named fallback, rendered in a sandbox.

Templates come from model repositories, so they are untrusted code: they run in Jinja's
:class:`~jinja2.sandbox.ImmutableSandboxedEnvironment` (as transformers does), which refuses
access to Python internals (``__class__``, ``__globals__``, ...) and mutation of the inputs.

Besides rendering, a template tells us which characters of the rendered text belong to each
assistant turn, so the tokenizer layer can train on exactly those tokens (see :meth:`ChatTemplate.spans`).

Tool use: messages are the normalized OpenAI-shaped dicts of :mod:`ft.data.formats`, and tool definitions
go in as ``tools=``, exactly as transformers' ``apply_chat_template`` passes them (message keys whose value
is None are dropped first, as transformers does; a ``tool_use`` variant of the template is used when tools
are given). A template that never mentions tool calls (the embedded SmolLM2's, most base templates) gets
ft's one fallback, :func:`fallback_messages`: the tools are listed in the system turn, each call is written
as ``<tool_call>{"name": ..., "arguments": {...}}</tool_call>`` in the assistant turn, and tool results
become a user turn of ``<tool_response>...</tool_response>`` blocks.
"""

from __future__ import annotations

import json
import os
from collections.abc import Sequence
from datetime import datetime
from typing import Any

import jinja2
from jinja2.ext import Extension
from jinja2.runtime import LoopContext
from jinja2.sandbox import ImmutableSandboxedEnvironment

from ft.data.formats import ASSISTANT, SYSTEM, TOOL, USER, Message, Tool, is_plain
from ft.data.validate import Reason, RecordError
from ft.errors import ErrorCode, FtError

_PROBE = "\ue002"  # a private-use character no real reply starts with

# Our own fallbacks for base models without a template. `{{ bos_token }}`/`{{ eos_token }}` come from
# the tokenizer, so the sequence starts and ends the way the model was pre-trained.
CHATML = (
    "{% for m in messages %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
LLAMA2 = (
    "{% if messages[0].role == 'system' %}{% set sys = messages[0].content %}{% set rest = messages[1:] %}"
    "{% else %}{% set sys = none %}{% set rest = messages %}{% endif %}"
    "{% for m in rest %}"
    "{% if m.role == 'user' %}{{ bos_token }}[INST] "
    "{% if loop.first and sys %}<<SYS>>\n{{ sys }}\n<</SYS>>\n\n{% endif %}{{ m.content }} [/INST]"
    "{% else %} {{ m.content }} {{ eos_token }}{% endif %}"
    "{% endfor %}"
)
MISTRAL = (
    "{% if messages[0].role == 'system' %}{% set sys = messages[0].content %}{% set rest = messages[1:] %}"
    "{% else %}{% set sys = none %}{% set rest = messages %}{% endif %}"
    "{{ bos_token }}{% for m in rest %}"
    "{% if m.role == 'user' %}[INST] {% if loop.first and sys %}{{ sys }}\n\n{% endif %}{{ m.content }}[/INST]"
    "{% else %} {{ m.content }}{{ eos_token }}{% endif %}"
    "{% endfor %}"
)
ALPACA = (
    "{{ bos_token }}{% for m in messages %}"
    "{% if m.role == 'system' %}{{ m.content }}\n\n"
    "{% elif m.role == 'user' %}### Instruction:\n{{ m.content }}\n\n### Response:\n"
    "{% else %}{{ m.content }}{{ eos_token }}\n\n{% endif %}"
    "{% endfor %}"
)
NAMED = {"chatml": CHATML, "llama2": LLAMA2, "mistral": MISTRAL, "alpaca": ALPACA}
TEMPLATE_CHOICES = ("model", *NAMED)


class _GenerationTag(Extension):
    """``{% generation %}...{% endgeneration %}`` (transformers' assistant-mask marker): render the body."""

    tags = {"generation"}

    def parse(self, parser: Any) -> Any:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.Scope(body, lineno=lineno)


class TemplateRaised(Exception):
    """The template itself called raise_exception (e.g. 'roles must alternate')."""


def _raise(message: str) -> None:
    raise TemplateRaised(message)


def _tojson(
    value: Any,
    ensure_ascii: bool = False,
    indent: int | None = None,
    separators: tuple[str, str] | None = None,
    sort_keys: bool = False,
) -> str:
    # transformers' filter (not Jinja's, which escapes HTML characters), with the same arguments
    return json.dumps(
        value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys
    )


_LOOP_ATTRS = frozenset(
    {
        "first",
        "last",
        "index",
        "index0",
        "length",
        "revindex",
        "revindex0",
        "previtem",
        "nextitem",
        "depth",
        "depth0",
    }
)


_DICT_ATTRS = frozenset(dir(dict))


class _StrictSandbox(ImmutableSandboxedEnvironment):
    """The immutable sandbox, but an unsafe attribute raises at once instead of rendering as empty."""

    def getattr(self, obj: Any, attribute: str) -> Any:
        # `loop.first` & co. are plain values Jinja computes; skip the sandbox's per-access checks
        # for them (they run for every message of every record).
        if attribute in _LOOP_ATTRS and type(obj) is LoopContext:
            return getattr(obj, attribute)
        # `message.role`, `tool_call.function`: a plain dict's key, where Jinja would look up the (missing)
        # Python attribute first and then the key. Dict method names (`items`, `get`, ...) take the full path.
        if type(obj) is dict and attribute not in _DICT_ATTRS:
            try:
                return obj[attribute]
            except KeyError:
                return self.undefined(obj=obj, name=attribute)
        return super().getattr(obj, attribute)

    def unsafe_undefined(self, obj: Any, attribute: str) -> Any:
        raise jinja2.exceptions.SecurityError(
            f"access to attribute {attribute!r} of a {type(obj).__name__!r} object is unsafe"
        )


def _env() -> ImmutableSandboxedEnvironment:
    env = _StrictSandbox(
        trim_blocks=True,
        lstrip_blocks=True,
        extensions=[_GenerationTag, "jinja2.ext.loopcontrols"],
        undefined=jinja2.Undefined,
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env


class ChatTemplate:
    """A compiled chat template plus the tokenizer's special-token strings it may use.

    ``tool_source``: the model's ``tool_use`` template variant (transformers uses it whenever tools are
    given), if the tokenizer has one besides the default.
    """

    def __init__(
        self,
        source: str,
        name: str,
        special_tokens: dict[str, str | None] | None = None,
        tool_source: str | None = None,
    ):
        self.source = source
        self.name = name
        self.special = {k: (v or "") for k, v in (special_tokens or {}).items()}
        try:
            self._tmpl = _env().from_string(source)
        except jinja2.TemplateSyntaxError as e:
            raise FtError(
                ErrorCode.DATA_INVALID,
                f"chat template {name!r} is not valid Jinja (template line {e.lineno}): {e.message}",
                "fix tokenizer_config.json's chat_template, or pass --template chatml|llama2|mistral|alpaca",
            ) from None
        self._prefix_ok = True  # flips off the first time the template is not prefix-consistent
        self._layout: tuple[str, str, str] | None | bool = False  # False = not learned yet
        self._layout_checks = 32  # records on which the one-render path is compared with the exact one
        # Assistant turns whose text next to tool calls the template does not render (counted, reported).
        self.text_dropped = 0
        self.tool_template = (
            ChatTemplate(tool_source, f"{name} (tool_use)", special_tokens)
            if tool_source and tool_source != source
            else None
        )

    @property
    def text_dropped_turns(self) -> int:
        """Assistant turns so far whose text next to tool calls this template (or its tool_use variant) left out."""
        return self.text_dropped + (self.tool_template.text_dropped if self.tool_template is not None else 0)

    @property
    def renders_tools(self) -> bool:
        """Whether the template itself renders tool calls (else ft's fallback is used for tool data)."""
        return supports_tools(self.source) or (
            self.tool_template is not None and self.tool_template.renders_tools
        )

    @property
    def tool_style(self) -> str:
        """How this template writes tool calls: a :data:`ft.data.toolcalls.STYLES` name."""
        from ft.data.toolcalls import FALLBACK, detect_style

        t = self._for_tools(True)
        return detect_style(t.source) if t.renders_tools else FALLBACK

    def _for_tools(self, tools: bool) -> ChatTemplate:
        if self.tool_template is not None and (tools or not supports_tools(self.source)):
            return self.tool_template
        return self

    def render(
        self,
        messages: Sequence[Message],
        add_generation_prompt: bool = False,
        tools: Sequence[Tool] | None = None,
    ) -> str:
        """The conversation as text, as transformers' ``apply_chat_template(messages, tools=tools)`` renders it.

        Conversations with tool calls or tools on a template without tool support use the fallback.
        """
        if tools is None and is_plain(messages):
            return self._render(messages, add_generation_prompt, None)
        t = self._for_tools(tools is not None)
        if not t.renders_tools:
            return self._render(fallback_messages(messages, tools), add_generation_prompt, None)
        # transformers drops keys whose value is None (e.g. an assistant's content next to tool_calls)
        msgs = [m if len(m) == 2 else {k: v for k, v in m.items() if v is not None} for m in messages]
        return t._render(msgs, add_generation_prompt, None if tools is None else list(tools))

    def _render(
        self, messages: Sequence[Message], add_generation_prompt: bool, tools: list[Tool] | None
    ) -> str:
        try:
            return self._tmpl.render(
                messages=list(messages),
                tools=tools,
                documents=None,
                add_generation_prompt=add_generation_prompt,
                **self.special,
            )
        except jinja2.exceptions.SecurityError as e:
            raise FtError(
                ErrorCode.DATA_INVALID,
                f"chat template {self.name!r} tried to reach Python internals and was stopped by the sandbox: {e}",
                "use a trusted template: --template chatml|llama2|mistral|alpaca",
            ) from None
        except TemplateRaised as e:
            raise RecordError(Reason.TEMPLATE_ERROR, f"chat template refused the conversation: {e}") from None
        except (jinja2.TemplateError, TypeError, ValueError, KeyError, IndexError, AttributeError) as e:
            raise RecordError(
                Reason.TEMPLATE_ERROR, f"chat template failed: {type(e).__name__}: {e}"
            ) from None

    def spans(
        self,
        messages: Sequence[Message],
        train_on: str = "assistant",
        tools: Sequence[Tool] | None = None,
    ) -> tuple[str, list[tuple[int, int]]]:
        """The rendered conversation and the character spans [start, end) of the trained assistant turns.

        An assistant turn's span runs from the end of the prompt that precedes it (rendered with
        ``add_generation_prompt``) to the end of the conversation rendered up to and including it,
        so it covers the reply, its tool calls and the template's end-of-turn marker (the model must
        learn to stop). Tool results, system and user turns are never in a span.
        ``train_on``: ``assistant`` (every assistant turn), ``last`` (the last one) or ``all`` (whole text).
        """
        if tools is not None or not is_plain(messages):
            t = self._for_tools(tools is not None)
            if not t.renders_tools:
                # The fallback turns tool data into plain turns: the plain path (and its fast layout) applies.
                return self.spans(fallback_messages(messages, tools), train_on)
            return t._tool_spans(messages, train_on, tools)
        full = self.render(messages)
        if train_on == "all":
            return full, [(0, len(full))]
        # Locate every assistant turn in order (a reply may repeat), then keep the trained ones.
        idx = [i for i, m in enumerate(messages) if m["role"] == ASSISTANT]
        keep = slice(-1, None) if train_on == "last" else slice(None)
        fast = self._spans_by_layout(messages, idx, full)
        if fast is not None and self._layout_checks <= 0:
            return full, _with_leading_space(full, fast)[keep]
        spans = self._exact_spans(messages, idx, full)
        if fast is not None:
            self._layout_checks -= 1
            if fast != spans:
                self._layout = None  # this template does not follow its own probe: always render prefixes
        return full, _with_leading_space(full, spans)[keep]

    def _tool_spans(
        self, messages: Sequence[Message], train_on: str, tools: Sequence[Tool] | None
    ) -> tuple[str, list[tuple[int, int]]]:
        """Spans of a conversation with tool calls on a template that renders them natively.

        Always the exact method: the assistant turn is what rendering it adds to the prompt before it.
        Templates that place the tool list relative to the last user turn (Mistral) are not
        prefix-consistent across turns; the turn's rendered text is then found in the full conversation.
        """
        full = self.render(messages, tools=tools)
        if train_on == "all":
            return full, [(0, len(full))]
        idx = [i for i, m in enumerate(messages) if m["role"] == ASSISTANT]
        spans: list[tuple[int, int]] = []
        cursor = 0
        for i in idx:
            prompt = self.render(messages[:i], add_generation_prompt=True, tools=tools)
            upto = full if i == len(messages) - 1 else self.render(messages[: i + 1], tools=tools)
            span = None
            start = len(prompt) if upto.startswith(prompt) else None
            if start is None:
                # The context renders differently when the conversation ends on a user turn (Mistral puts the
                # system message into the last user turn): compare with a probe reply in the same context.
                probe = self.render([*messages[:i], {"role": ASSISTANT, "content": _PROBE}], tools=tools)
                start = len(os.path.commonprefix([upto, probe]))
            if start < len(upto):
                if full.startswith(upto) and start >= cursor:
                    span = (start, len(upto))
                else:
                    pos = full.find(upto[start:], cursor)
                    if pos >= 0:
                        span = (pos, pos + len(upto) - start)
            if span is None:
                span = self._span_in_context(messages, i, full, tools, cursor)
            if span is None:
                content = messages[i]["content"]
                if not content:
                    raise RecordError(
                        Reason.TEMPLATE_ERROR,
                        f"cannot find the tool calls of message {i + 1} in the rendered conversation "
                        "(the chat template renders that turn differently in context)",
                    )
                span = self._span_by_search(content, full, cursor)
            calls = messages[i].get("tool_calls")
            if calls:
                turn = full[span[0] : span[1]]
                for call in calls:
                    if call["function"]["name"] not in turn:
                        raise RecordError(
                            Reason.TEMPLATE_ERROR,
                            f"the chat template dropped the tool call {call['function']['name']!r} of message {i + 1}",
                        )
                text = messages[i]["content"]
                if text and text.strip() not in turn:
                    self.text_dropped += 1  # Mistral v0.3, Llama 3.1: no text next to calls in their format
            spans.append(span)
            cursor = span[1]
        spans = _with_leading_space(full, spans)
        return full, spans[-1:] if train_on == "last" else spans

    def _span_in_context(
        self, messages: Sequence[Message], i: int, full: str, tools: Sequence[Tool] | None, cursor: int
    ) -> tuple[int, int] | None:
        """Turn ``i`` found by rendering the whole conversation with a probe reply in its place.

        For templates that render a turn differently when it is the last one (Qwen3 adds an empty
        think block to the final turn only): what differs from the probe's render is the turn's own
        text, in its real context; the end-of-turn marker after it (the layout's) is trained too.
        """
        alt = [*messages[:i], {"role": ASSISTANT, "content": _PROBE}, *messages[i + 1 :]]
        try:
            other = self.render(alt, tools=tools)
        except (RecordError, FtError):
            return None
        start = len(os.path.commonprefix([full, other]))
        end = len(full) - len(os.path.commonprefix([full[::-1], other[::-1]]))
        if not cursor <= start < end:
            return None
        if self._layout is False:
            self._layout = self._learn_layout()
        tail = self._layout[2] if self._layout else self.special.get("eos_token") or ""  # type: ignore[index]
        if tail and full.startswith(tail, end):
            end += len(tail)
        return start, end

    def _exact_spans(self, messages: Sequence[Message], idx: list[int], full: str) -> list[tuple[int, int]]:
        spans: list[tuple[int, int]] = []
        search_from = 0
        for i in idx:
            span = self._span_by_prefix(messages, i, full) if self._prefix_ok else None
            if span is None:
                span = self._span_by_search(messages[i]["content"], full, search_from)
            spans.append(span)
            search_from = span[1]
        return spans

    def _learn_layout(self) -> tuple[str, str, str] | None:
        """What surrounds an assistant reply, learned once from a probe conversation.

        Returns (text between a user's content and the reply, the part of it that is trained,
        text after the reply that closes the turn). With it a record needs one render instead of
        two per assistant turn; it is checked against the exact method on the first records.
        """
        user, reply = "\ue000probe question\ue001", "\ue002probe reply\ue003"
        try:
            prompt = self.render([{"role": USER, "content": user}], add_generation_prompt=True)
            full = self.render([{"role": USER, "content": user}, {"role": ASSISTANT, "content": reply}])
        except (RecordError, FtError):
            return None
        u, a = full.find(user), full.find(reply)
        if u < 0 or a < 0 or not full.startswith(prompt) or not u + len(user) <= len(prompt) <= a:
            return None
        return full[u + len(user) : a], full[len(prompt) : a], full[a + len(reply) :]

    def _spans_by_layout(
        self, messages: Sequence[Message], idx: list[int], full: str
    ) -> list[tuple[int, int]] | None:
        if self._layout is False:
            self._layout = self._learn_layout()
        if not self._layout:
            return None
        head, lead, tail = self._layout  # type: ignore[misc]
        spans = []
        cursor = 0
        for i in idx:
            content = messages[i]["content"]
            pos = full.find(head + content, cursor)
            if pos < 0:
                return None
            start = pos + len(head)
            end = start + len(content)
            if not full.startswith(tail, end):
                return None
            spans.append((start - len(lead), end + len(tail)))
            cursor = end + len(tail)
        return spans

    def _span_by_prefix(self, messages: Sequence[Message], i: int, full: str) -> tuple[int, int] | None:
        prompt = self.render(messages[:i], add_generation_prompt=True)
        upto = full if i == len(messages) - 1 else self.render(messages[: i + 1])
        if full.startswith(upto) and upto.startswith(prompt) and len(upto) > len(prompt):
            return len(prompt), len(upto)
        # Templates that rewrite earlier turns (drop reasoning, insert dates) are not prefix-consistent;
        # find the reply in the text instead, for this and every later record.
        self._prefix_ok = False
        return None

    def _span_by_search(self, content: str, full: str, start: int) -> tuple[int, int]:
        pos = full.find(content, start)
        if pos < 0:
            raise RecordError(
                Reason.TEMPLATE_ERROR, "the chat template dropped or changed an assistant reply"
            )
        end = pos + len(content)
        eos = self.special.get("eos_token") or ""
        tail = full[end:]
        stripped = tail.lstrip(" ")
        if eos and stripped.startswith(eos):
            end += len(tail) - len(stripped) + len(eos)
        return pos, end


def supports_tools(source: str) -> bool:
    """Whether a chat template renders tool calls itself (it reads ``tool_calls``/``tool_call``)."""
    return "tool_call" in source


# ft's fallback for templates without tool support (documented in docs/datasets.md).
FALLBACK_TOOLS_HEADER = (
    "# Tools\n\nYou can call the functions below, described as JSON schemas:\n<tools>\n{tools}\n</tools>\n\n"
    "To call one, answer with a JSON object inside <tool_call></tool_call> tags, one per call:\n"
    '<tool_call>\n{{"name": "<function name>", "arguments": {{<arguments as a JSON object>}}}}\n</tool_call>'
)


def fallback_call_text(name: str, arguments: Any) -> str:
    """One call as the fallback writes it: ``<tool_call>\\n{"name": ..., "arguments": ...}\\n</tool_call>``."""
    return (
        "<tool_call>\n"
        + json.dumps({"name": name, "arguments": arguments}, ensure_ascii=False)
        + "\n</tool_call>"
    )


def fallback_messages(messages: Sequence[Message], tools: Sequence[Tool] | None) -> list[Message]:
    """Tool data as plain turns, for a template without tool support (ft's one fallback).

    * the tool list goes at the end of the system turn (a system turn is added when there is none);
    * an assistant turn's calls follow its text, each as ``<tool_call>{json}</tool_call>`` on its own lines;
    * consecutive tool results become one user turn of ``<tool_response>\\n...\\n</tool_response>`` blocks.
    """
    out: list[Message] = []
    if tools:
        listing = FALLBACK_TOOLS_HEADER.format(
            tools="\n".join(json.dumps(t, ensure_ascii=False) for t in tools)
        )
        if messages and messages[0]["role"] == SYSTEM:
            out.append({"role": SYSTEM, "content": messages[0]["content"] + "\n\n" + listing})
            messages = messages[1:]
        else:
            out.append({"role": SYSTEM, "content": listing})
    for m in messages:
        role = m["role"]
        if role == TOOL:
            block = "<tool_response>\n" + m["content"] + "\n</tool_response>"
            if out and out[-1]["role"] == USER and out[-1].get("_tool"):
                out[-1] = {"role": USER, "content": out[-1]["content"] + "\n" + block, "_tool": True}
            else:
                out.append({"role": USER, "content": block, "_tool": True})
        elif role == ASSISTANT and m.get("tool_calls"):
            calls = "\n".join(
                fallback_call_text(c["function"]["name"], c["function"]["arguments"]) for c in m["tool_calls"]
            )
            text = m.get("content")
            out.append({"role": ASSISTANT, "content": f"{text}\n{calls}" if text else calls})
        else:
            out.append({"role": role, "content": m["content"]})
    return [{"role": m["role"], "content": m["content"]} if "_tool" in m else m for m in out]


def _with_leading_space(full: str, spans: list[tuple[int, int]]) -> list[tuple[int, int]]:
    """Extend each span back over spaces ending the prompt ("[/INST] Sure", "Assistant: Sure").

    Tokenizers fold that space into the reply's first token; a token counts as trained when its
    first character is in a span, so without this the reply's first word would not be trained.
    """
    out = []
    prev = 0
    for s, e in spans:
        while s > prev and full[s - 1] in " \t":
            s -= 1
        out.append((s, e))
        prev = e
    return out


def make_template(
    name: str,
    model_template: str | list[dict[str, str]] | dict[str, str] | None,
    special: dict[str, str | None],
    model_name: str = "the model",
) -> ChatTemplate:
    """``name`` = "model" (the tokenizer's own template) or one of the named fallbacks."""
    if name != "model":
        if name not in NAMED:
            raise FtError(
                ErrorCode.USAGE, f"unknown template {name!r}", f"choose one of: {', '.join(TEMPLATE_CHOICES)}"
            )
        return ChatTemplate(NAMED[name], name, special)
    tool_source = None
    if isinstance(model_template, list | dict):
        # [{"name": "default", "template": ...}, {"name": "tool_use", ...}] (or the same as a dict)
        by_name = (
            {t.get("name"): t.get("template") for t in model_template if isinstance(t, dict)}
            if isinstance(model_template, list)
            else dict(model_template)
        )
        model_template = by_name.get("default") or next(iter(by_name.values()), None)
        tool_source = by_name.get("tool_use")
    if not model_template:
        return MissingTemplate(
            FtError(
                ErrorCode.DATA_INVALID,
                f"{model_name} has no chat template (a base model?), so its conversations cannot be rendered",
                "pick a fallback: --template chatml (or llama2, mistral, alpaca), or set data.template in train.yml",
            )
        )
    return ChatTemplate(model_template, "model", special, tool_source)


class MissingTemplate(ChatTemplate):
    """Stands in for a model without a chat template: fine for plain-text data, an error at the first chat record."""

    def __init__(self, error: FtError):
        super().__init__("", "none", {})
        self.error = error

    def _render(self, messages: Sequence[Message], add_generation_prompt: bool, tools: Any) -> str:
        raise self.error


class StopMarkers:
    """Where a reply ends: the tokenizer's EOS ids and the chat template's end-of-turn marker.

    The one rule for evaluation's generations, training's sample generations and the Modelfile's
    ``PARAMETER stop`` lines. ``ids``: token ids that end a reply (the EOS ids, plus the end-of-turn
    marker when it is one token); ``strings``: text that ends a reply (the marker); ``names``: all of them
    as text, for people and for tools that stop on strings.
    """

    def __init__(self, ids: set[int], strings: list[str], names: list[str], template: ChatTemplate | None):
        self.ids = tuple(sorted(ids))
        self.strings = strings
        self.names = names
        self.template = template


def stop_markers(tokenizer: Any, template_name: str = "model", model_name: str = "the model") -> StopMarkers:
    """The :class:`StopMarkers` of ``tokenizer`` rendered with the chat template ``template_name``."""
    from ft.data.metrics import end_of_turn
    from ft.errors import FtError

    ids = {int(t) for t in (getattr(tokenizer, "eos_token_ids", None) or [])}
    strings: list[str] = []
    tmpl: ChatTemplate | None = None
    try:
        special = {
            "bos_token": getattr(tokenizer, "bos_token", None),
            "eos_token": getattr(tokenizer, "eos_token", None),
        }
        tmpl = make_template(template_name, getattr(tokenizer, "chat_template", None), special, model_name)
        eot = end_of_turn(tmpl.render)
    except FtError:
        eot = ""
    if eot:
        strings.append(eot)
        one = tokenizer.encode(eot, add_special_tokens=False)
        if len(one) == 1:
            ids.add(int(one[0]))
    names = sorted({tokenizer.decode([t]) for t in ids} | set(strings))
    return StopMarkers(ids, strings, names, tmpl)
