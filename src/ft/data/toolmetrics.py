"""Tool-call metrics: does a model call the right tool with the right arguments where the reference does,
and answer in text where the reference does. Pure functions over parsed calls; definitions:

A *case* is one assistant turn of the reference: a **call case** when the reference turn calls tools, an
**answer case** when it answers in text. The model's generation for the same prompt is parsed into calls
(:mod:`ft.data.toolcalls`); a generation *attempts* a call when it has a call marker, and the attempt is
*parseable* when every call in it has a name and arguments that are a JSON object.

* ``parseable_call_rate``: call cases whose generation holds at least one call, every one parseable.
* ``tool_name_accuracy``: call cases whose parsed calls name the reference's tools, in order.
* ``arguments_exact_match``: call cases whose parsed calls equal the reference's (names and arguments as
  JSON values; key order and whitespace do not matter).
* ``arguments_f1``: per call case, F1 of the (key, value) pairs of the arguments, calls aligned by position
  (a missing or extra call's pairs all count as misses); mean over call cases (0 when nothing was called).
* ``answered_instead_of_call``: call cases where the generation attempted no call (answered in text).
* ``called_instead_of_answer``: answer cases where the generation attempted a call.
* ``schema_valid_rate``: of the parseable predicted calls whose case has tool definitions, the share that
  name a defined tool and whose arguments satisfy its ``parameters`` JSON schema (:func:`schema_errors`);
  ``None`` when no case had definitions (records may carry calls without definitions).
* ``malformed_calls``: generations that attempted a call that does not parse (any case).
* ``confusion``: counts of ``reference/generation`` kinds: ``call/call``, ``call/answer``, ``answer/call``,
  ``answer/answer`` (a malformed attempt counts as a call).

Rates whose denominator is empty are ``None``.
"""

from __future__ import annotations

import json
import math
import re
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from pydantic import BaseModel, Field


@dataclass(frozen=True)
class Call:
    """One tool call: the function's name and its arguments (a parsed JSON value; a str when not JSON)."""

    name: str
    arguments: Any


def as_call(obj: Any) -> Call:
    """A :class:`Call` from an OpenAI-style ``{"function": {"name", "arguments"}}``, ``{"name", "arguments"}``
    or an object with ``name``/``arguments`` attributes; string arguments are decoded when they are JSON."""
    if isinstance(obj, Call):
        return obj
    if isinstance(obj, Mapping):
        fn: Mapping[str, Any] = obj["function"] if isinstance(obj.get("function"), Mapping) else obj
        name, args = fn.get("name"), fn.get("arguments", fn.get("parameters"))
    else:
        fn = getattr(obj, "function", None) or obj
        name, args = getattr(fn, "name", None), getattr(fn, "arguments", None)
    if isinstance(args, str):
        try:
            args = json.loads(args) if args.strip() else {}
        except json.JSONDecodeError:
            pass
    return Call(name=str(name) if name is not None else "", arguments={} if args is None else args)


def as_calls(objs: Iterable[Any] | None) -> list[Call]:
    return [as_call(o) for o in objs or ()]


def well_formed(call: Call) -> bool:
    """A name and arguments that are a JSON object."""
    return bool(call.name) and isinstance(call.arguments, dict)


def canonical(value: Any) -> str:
    """A JSON value as one string: sorted keys, no spacing; 1 and 1.0 are the same number, true is not 1."""

    def norm(v: Any) -> Any:
        if isinstance(v, bool) or v is None or isinstance(v, str):
            return v
        if isinstance(v, int | float):
            f = float(v)
            return int(f) if math.isfinite(f) and f.is_integer() else f
        if isinstance(v, Mapping):
            return {str(k): norm(x) for k, x in v.items()}
        if isinstance(v, list | tuple):
            return [norm(x) for x in v]
        return str(v)

    return json.dumps(norm(value), sort_keys=True, separators=(",", ":"), ensure_ascii=False)


# ------------------------------------------------------------------------------------ JSON schema
_TYPES: dict[str, Callable[[Any], bool]] = {
    "string": lambda v: isinstance(v, str),
    "integer": lambda v: (
        (isinstance(v, int) and not isinstance(v, bool)) or (isinstance(v, float) and v.is_integer())
    ),
    "number": lambda v: isinstance(v, int | float) and not isinstance(v, bool),
    "boolean": lambda v: isinstance(v, bool),
    "object": lambda v: isinstance(v, dict),
    "array": lambda v: isinstance(v, list),
    "null": lambda v: v is None,
}


def schema_errors(value: Any, schema: Any, path: str = "$") -> list[str]:
    """Why ``value`` does not satisfy ``schema`` (empty when it does), for the JSON-schema subset that
    function parameters use: ``type`` (one or a list), ``enum``, ``const``, ``properties``, ``required``,
    ``additionalProperties`` (bool or schema), ``items``, ``minItems``/``maxItems``, ``minLength``/``maxLength``,
    ``pattern``, ``minimum``/``maximum``/``exclusiveMinimum``/``exclusiveMaximum``, ``anyOf``/``oneOf``/``allOf``.
    Other keywords (``description``, ``format``, ``$ref``, ...) are not checked."""
    if schema is True or schema is None or not isinstance(schema, Mapping):
        return [] if schema is not False else [f"{path}: no value is allowed here"]
    errs: list[str] = []
    t = schema.get("type")
    if t is not None:
        types = [t] if isinstance(t, str) else list(t)
        known = [x for x in types if x in _TYPES]
        if known and not any(_TYPES[x](value) for x in known):
            return [f"{path}: expected {' or '.join(known)}, got {_json_type(value)}"]
    if "enum" in schema and isinstance(schema["enum"], list):
        if canonical(value) not in {canonical(x) for x in schema["enum"]}:
            errs.append(f"{path}: {canonical(value)} is not one of {canonical(schema['enum'])}")
    if "const" in schema and canonical(value) != canonical(schema["const"]):
        errs.append(f"{path}: must be {canonical(schema['const'])}")
    if isinstance(value, dict):
        props: Mapping[str, Any] = (
            schema["properties"] if isinstance(schema.get("properties"), Mapping) else {}
        )
        for key in schema.get("required") or ():
            if key not in value:
                errs.append(f"{path}: missing required {key!r}")
        extra = schema.get("additionalProperties", True)
        for key, v in value.items():
            if key in props:
                errs += schema_errors(v, props[key], f"{path}.{key}")
            elif extra is False:
                errs.append(f"{path}: unexpected {key!r}")
            elif isinstance(extra, Mapping):
                errs += schema_errors(v, extra, f"{path}.{key}")
    if isinstance(value, list):
        items = schema.get("items")
        if isinstance(items, Mapping):
            for k, v in enumerate(value):
                errs += schema_errors(v, items, f"{path}[{k}]")
        if isinstance(schema.get("minItems"), int) and len(value) < schema["minItems"]:
            errs.append(f"{path}: fewer than {schema['minItems']} items")
        if isinstance(schema.get("maxItems"), int) and len(value) > schema["maxItems"]:
            errs.append(f"{path}: more than {schema['maxItems']} items")
    if isinstance(value, str):
        if isinstance(schema.get("minLength"), int) and len(value) < schema["minLength"]:
            errs.append(f"{path}: shorter than {schema['minLength']} characters")
        if isinstance(schema.get("maxLength"), int) and len(value) > schema["maxLength"]:
            errs.append(f"{path}: longer than {schema['maxLength']} characters")
        if isinstance(schema.get("pattern"), str):
            try:
                if re.search(schema["pattern"], value) is None:
                    errs.append(f"{path}: does not match {schema['pattern']!r}")
            except re.error:
                pass  # a pattern Python cannot compile is not the model's fault
    if isinstance(value, int | float) and not isinstance(value, bool):
        for key, ok in (
            ("minimum", lambda b: value >= b),
            ("maximum", lambda b: value <= b),
            ("exclusiveMinimum", lambda b: value > b),
            ("exclusiveMaximum", lambda b: value < b),
        ):
            bound = schema.get(key)
            if isinstance(bound, int | float) and not isinstance(bound, bool) and not ok(bound):
                errs.append(f"{path}: {value} violates {key} {bound}")
    for key in ("allOf", "anyOf", "oneOf"):
        subs = schema.get(key)
        if not isinstance(subs, list) or not subs:
            continue
        results = [schema_errors(value, s, path) for s in subs]
        passed = sum(1 for r in results if not r)
        if key == "allOf":
            errs += [e for r in results for e in r]
        elif key == "anyOf" and passed == 0:
            errs.append(f"{path}: matches none of anyOf")
        elif key == "oneOf" and passed != 1:
            errs.append(f"{path}: matches {passed} of oneOf (exactly 1 needed)")
    return errs


def _json_type(v: Any) -> str:
    for name in ("null", "boolean", "integer", "number", "string", "array", "object"):
        if _TYPES[name](v):
            return name
    return type(v).__name__


def tool_schemas(tools: Iterable[Any] | None) -> dict[str, Any]:
    """``{name: parameters schema}`` of an OpenAI ``tools`` list (``{"type": "function", "function": {...}}``
    or bare function objects)."""
    out: dict[str, Any] = {}
    for t in tools or ():
        if not isinstance(t, Mapping):
            continue
        fn: Mapping[str, Any] = t["function"] if isinstance(t.get("function"), Mapping) else t
        if isinstance(fn.get("name"), str):
            out[fn["name"]] = fn.get("parameters") if fn.get("parameters") is not None else {}
    return out


def call_errors(call: Call, schemas: Mapping[str, Any]) -> list[str]:
    """Why a call does not fit the tool definitions (empty when it does)."""
    if not well_formed(call):
        return ["not a call with a name and a JSON object of arguments"]
    if call.name not in schemas:
        return [f"{call.name!r} is not one of the tools ({', '.join(sorted(schemas)) or 'none'})"]
    return schema_errors(call.arguments, schemas[call.name])


# ------------------------------------------------------------------------------------ per case
@dataclass(frozen=True)
class ToolCase:
    """One reference assistant turn and the model's parsed generation for the same prompt.

    ``predicted``: the calls parsed from the generation; ``malformed``: the generation has a call marker
    whose call does not parse; ``schemas``: the case's tool definitions, ``None`` when it has none."""

    reference: Sequence[Call]
    predicted: Sequence[Call] = ()
    malformed: bool = False
    schemas: Mapping[str, Any] | None = None
    label: str = "unlabelled"
    group: str | None = None

    @property
    def is_call(self) -> bool:
        return len(self.reference) > 0


@dataclass(frozen=True)
class CaseScore:
    is_call: bool
    attempted: bool
    parseable: bool
    name_match: bool
    exact_match: bool
    f1: float
    valid_calls: int
    checked_calls: int


def _pairs(call: Call, k: int) -> set[tuple[int, str, str]]:
    if not isinstance(call.arguments, dict):
        return {(k, "\x00raw", canonical(call.arguments))}
    return {(k, str(key), canonical(v)) for key, v in call.arguments.items()}


def arguments_f1(predicted: Sequence[Call], reference: Sequence[Call]) -> float:
    """F1 of the (call position, key, value) pairs of the arguments; 1.0 when both have no pairs."""
    p = set().union(*(_pairs(c, k) for k, c in enumerate(predicted))) if predicted else set()
    r = set().union(*(_pairs(c, k) for k, c in enumerate(reference))) if reference else set()
    if not p and not r:
        return 1.0 if len(predicted) == len(reference) else 0.0
    hit = len(p & r)
    if hit == 0:
        return 0.0
    prec, rec = hit / len(p), hit / len(r)
    return 2 * prec * rec / (prec + rec)


def score_case(case: ToolCase) -> CaseScore:
    pred, ref = list(case.predicted), list(case.reference)
    attempted = case.malformed or bool(pred)
    parseable = bool(pred) and all(well_formed(c) for c in pred) and not case.malformed
    names = [c.name for c in pred] == [c.name for c in ref]
    exact = (
        parseable
        and names
        and all(canonical(a.arguments) == canonical(b.arguments) for a, b in zip(pred, ref, strict=True))
    )
    checked = valid = 0
    if case.schemas is not None and parseable:
        for c in pred:
            checked += 1
            valid += not call_errors(c, case.schemas)
    return CaseScore(
        is_call=case.is_call,
        attempted=attempted,
        parseable=parseable,
        name_match=case.is_call and parseable and names,
        exact_match=case.is_call and exact,
        f1=arguments_f1(pred, ref) if case.is_call and parseable else 0.0,
        valid_calls=valid,
        checked_calls=checked,
    )


# ------------------------------------------------------------------------------------ aggregates
class ToolMetrics(BaseModel):
    """Tool-call metrics of one model on a set of cases; a rate is None when it has no case to count."""

    cases: int
    call_cases: int = Field(description="cases whose reference calls a tool")
    answer_cases: int = Field(description="cases whose reference answers in text")
    parseable_call_rate: float | None
    tool_name_accuracy: float | None
    arguments_exact_match: float | None
    arguments_f1: float | None
    answered_instead_of_call: float | None
    called_instead_of_answer: float | None
    schema_valid_rate: float | None
    malformed_calls: int
    confusion: dict[str, int] = Field(description="reference/generation: call/call, call/answer, ...")


RATE_KEYS = (
    "parseable_call_rate",
    "tool_name_accuracy",
    "arguments_exact_match",
    "arguments_f1",
    "answered_instead_of_call",
    "called_instead_of_answer",
    "schema_valid_rate",
)
LOWER_IS_BETTER = {"answered_instead_of_call", "called_instead_of_answer"}


def _rate(num: float, den: int) -> float | None:
    return num / den if den else None


def aggregate(scores: Sequence[CaseScore]) -> ToolMetrics:
    calls = [s for s in scores if s.is_call]
    answers = [s for s in scores if not s.is_call]
    checked = sum(s.checked_calls for s in scores)
    return ToolMetrics(
        cases=len(scores),
        call_cases=len(calls),
        answer_cases=len(answers),
        parseable_call_rate=_rate(sum(s.parseable for s in calls), len(calls)),
        tool_name_accuracy=_rate(sum(s.name_match for s in calls), len(calls)),
        arguments_exact_match=_rate(sum(s.exact_match for s in calls), len(calls)),
        arguments_f1=_rate(sum(s.f1 for s in calls), len(calls)),
        answered_instead_of_call=_rate(sum(not s.attempted for s in calls), len(calls)),
        called_instead_of_answer=_rate(sum(s.attempted for s in answers), len(answers)),
        schema_valid_rate=_rate(sum(s.valid_calls for s in scores), checked) if checked else None,
        malformed_calls=sum(1 for s in scores if s.attempted and not s.parseable),
        confusion={
            "call/call": sum(s.attempted for s in calls),
            "call/answer": sum(not s.attempted for s in calls),
            "answer/call": sum(s.attempted for s in answers),
            "answer/answer": sum(not s.attempted for s in answers),
        },
    )


def tool_metrics(cases: Sequence[ToolCase]) -> ToolMetrics:
    return aggregate([score_case(c) for c in cases])


def grouped(cases: Sequence[ToolCase], key: Callable[[ToolCase], str | None]) -> dict[str, ToolMetrics]:
    """Metrics per value of ``key(case)`` (cases whose key is None are left out), values sorted."""
    buckets: dict[str, list[CaseScore]] = {}
    for c in cases:
        k = key(c)
        if k is not None:
            buckets.setdefault(str(k), []).append(score_case(c))
    return {k: aggregate(v) for k, v in sorted(buckets.items())}
