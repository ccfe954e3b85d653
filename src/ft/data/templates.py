"""Chat templates: the model's own Jinja template, or a named fallback, rendered in a sandbox.

Templates come from model repositories, so they are untrusted code: they run in Jinja's
:class:`~jinja2.sandbox.ImmutableSandboxedEnvironment` (as transformers does), which refuses
access to Python internals (``__class__``, ``__globals__``, ...) and mutation of the inputs.

Besides rendering, a template tells us which characters of the rendered text belong to each
assistant turn, so the tokenizer layer can train on exactly those tokens (see :meth:`ChatTemplate.spans`).
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import datetime
from typing import Any

import jinja2
from jinja2.ext import Extension
from jinja2.runtime import LoopContext
from jinja2.sandbox import ImmutableSandboxedEnvironment

from ft.data.validate import Reason, RecordError
from ft.errors import ErrorCode, FtError

Message = tuple[str, str]

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
    value: Any, indent: int | None = None, ensure_ascii: bool = False, sort_keys: bool = False
) -> str:
    return json.dumps(value, indent=indent, ensure_ascii=ensure_ascii, sort_keys=sort_keys)


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


class _StrictSandbox(ImmutableSandboxedEnvironment):
    """The immutable sandbox, but an unsafe attribute raises at once instead of rendering as empty."""

    def getattr(self, obj: Any, attribute: str) -> Any:
        # `loop.first` & co. are plain values Jinja computes; skip the sandbox's per-access checks
        # for them (they run for every message of every record).
        if attribute in _LOOP_ATTRS and type(obj) is LoopContext:
            return getattr(obj, attribute)
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
    """A compiled chat template plus the tokenizer's special-token strings it may use."""

    def __init__(self, source: str, name: str, special_tokens: dict[str, str | None] | None = None):
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

    def render(self, messages: Sequence[Message], add_generation_prompt: bool = False) -> str:
        msgs = [{"role": r, "content": c} for r, c in messages]
        try:
            return self._tmpl.render(
                messages=msgs, add_generation_prompt=add_generation_prompt, **self.special
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
        self, messages: Sequence[Message], train_on: str = "assistant"
    ) -> tuple[str, list[tuple[int, int]]]:
        """The rendered conversation and the character spans [start, end) of the trained assistant turns.

        An assistant turn's span runs from the end of the prompt that precedes it (rendered with
        ``add_generation_prompt``) to the end of the conversation rendered up to and including it,
        so it covers the reply and the template's end-of-turn marker (the model must learn to stop).
        ``train_on``: ``assistant`` (every assistant turn), ``last`` (the last one) or ``all`` (whole text).
        """
        full = self.render(messages)
        if train_on == "all":
            return full, [(0, len(full))]
        # Locate every assistant turn in order (a reply may repeat), then keep the trained ones.
        idx = [i for i, (r, _) in enumerate(messages) if r == "assistant"]
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

    def _exact_spans(self, messages: Sequence[Message], idx: list[int], full: str) -> list[tuple[int, int]]:
        spans: list[tuple[int, int]] = []
        search_from = 0
        for i in idx:
            span = self._span_by_prefix(messages, i, full) if self._prefix_ok else None
            if span is None:
                span = self._span_by_search(messages[i][1], full, search_from)
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
            prompt = self.render([("user", user)], add_generation_prompt=True)
            full = self.render([("user", user), ("assistant", reply)])
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
            content = messages[i][1]
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
    model_template: str | list[dict[str, str]] | None,
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
    if isinstance(model_template, list):  # [{"name": "default", "template": ...}, {"name": "tool_use", ...}]
        by_name = {t.get("name"): t.get("template") for t in model_template if isinstance(t, dict)}
        model_template = by_name.get("default") or next(iter(by_name.values()), None)
    if not model_template:
        return MissingTemplate(
            FtError(
                ErrorCode.DATA_INVALID,
                f"{model_name} has no chat template (a base model?), so its conversations cannot be rendered",
                "pick a fallback: --template chatml (or llama2, mistral, alpaca), or set data.template in train.yml",
            )
        )
    return ChatTemplate(model_template, "model", special)


class MissingTemplate(ChatTemplate):
    """Stands in for a model without a chat template: fine for plain-text data, an error at the first chat record."""

    def __init__(self, error: FtError):
        super().__init__("", "none", {})
        self.error = error

    def render(self, messages: Sequence[Message], add_generation_prompt: bool = False) -> str:
        raise self.error
