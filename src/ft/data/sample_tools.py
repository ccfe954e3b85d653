"""The tool-use sample `ft init --profile tools` writes: an assistant working in a note vault through tools.

Records have the shape of agents' training data (OpenAI tool use in chat records):

* ``tools``: the JSON-schema functions the assistant may call (the same five in every record);
* ``conversations``: a system message with the session context (date, open note), the user's request, an
  assistant message whose ``content`` is null and whose ``tool_calls`` hold ``{"id", "type": "function",
  "function": {"name", "arguments"}}`` (arguments a JSON string), the ``tool`` result (``tool_call_id``)
  and the assistant's final answer; some requests need no tool and are answered in text;
* ``label``: true for a correct conversation, false (about one in four) for a wrong one (wrong tool,
  wrong arguments, a call where none was needed, or an action claimed without calling the tool);
* extra keys kept as metadata: ``behavior`` (what the assistant did: correct, wrong_tool, wrong_arguments,
  unneeded_call, no_call), ``pattern`` (call_then_answer, text_only) and ``category`` (the request kind).

Desirable conversations follow fixed phrasings (a request kind always maps to one tool, "this note" always
means the open note), so a short LoRA run on the embedded 135M model learns the call format and the
tool choice; see docs/tools.md for the measured before/after numbers.
"""

from __future__ import annotations

import json
import random
from collections.abc import Callable, Iterator
from typing import Any


def _function(name: str, description: str, properties: dict[str, Any], required: list[str]) -> dict[str, Any]:
    """An OpenAI tool definition: a function whose parameters are one JSON-schema object."""
    parameters = {"type": "object", "properties": properties, "required": required}
    return {
        "type": "function",
        "function": {"name": name, "description": description, "parameters": parameters},
    }


_EDIT = {"filePath": {"type": "string"}, "content": {"type": "string"}}  # the parameters of the three edits
TOOLS: list[dict[str, Any]] = [
    _function(
        "search_notes",
        "Search the vault's notes for a text.",
        {
            "query": {"type": "string", "description": "words to look for"},
            "limit": {"type": "integer", "description": "most results", "minimum": 1},
        },
        ["query"],
    ),
    _function(
        "read_note",
        "Read a note.",
        {"filePath": {"type": "string", "description": "path of the note"}},
        ["filePath"],
    ),
    _function("append_content", "Add text at the end of a note.", _EDIT, ["filePath", "content"]),
    _function("prepend_content", "Add text at the start of a note.", _EDIT, ["filePath", "content"]),
    _function("create_note", "Create a new note.", _EDIT, ["filePath", "content"]),
]
TOOL_NAMES = [t["function"]["name"] for t in TOOLS]

_FOLDERS = ["Projects", "Journal", "Recipes", "Reading", "Work", "Travel"]
_TOPICS = [
    "garden",
    "budget",
    "roadmap",
    "sourdough",
    "marathon",
    "kyoto",
    "podcast",
    "thesis",
    "meeting",
    "books",
    "invoice",
    "guitar",
]
_ITEMS = [
    "buy more flour",
    "call the plumber",
    "review the draft",
    "book train tickets",
    "water the tomatoes",
    "send the invoice",
    "renew the passport",
    "back up the laptop",
    "order new strings",
    "email Maria",
    "plan the retro",
    "read chapter 4",
]
_DATES = ["2026-03-02", "2026-04-17", "2026-05-09", "2026-06-21", "2026-07-30", "2026-09-12"]
_CHAT = [
    ("How do I make a heading in markdown?", "Start the line with # and a space: # Heading."),
    ("How do I write a checklist in markdown?", "Use - [ ] for an open item and - [x] for a done one."),
    ("How do I link to another note?", "Write the note's name in double brackets: [[Note name]]."),
    ("How do I make text bold in markdown?", "Put two asterisks around it: **bold**."),
    (
        "What is a tag in my vault?",
        "A word after # in a note, such as #idea; notes with the same tag belong together.",
    ),
    ("Thanks, that's all for now.", "You're welcome. Ask me any time you need your notes."),
    ("Hello!", "Hello! I can search, read, create and edit your notes. What do you need?"),
    ("How do I make a bullet list in markdown?", "Start each line with - and a space."),
]


def _note(r: random.Random) -> str:
    return f"{r.choice(_FOLDERS)}/{r.choice(_TOPICS)}.md"


def _system(date: str, open_note: str) -> dict[str, Any]:
    return {
        "role": "system",
        "content": f"You are Quill, the assistant of a note vault. Today is {date}. "
        f"Open note: {open_note}. Use a tool to search, read or change notes; answer directly otherwise.",
    }


def _call(name: str, args: dict[str, Any], n: int) -> dict[str, Any]:
    return {
        "role": "assistant",
        "content": None,
        "tool_calls": [
            {
                "id": f"call_{n}",
                "type": "function",
                "function": {"name": name, "arguments": json.dumps(args, ensure_ascii=False)},
            }
        ],
    }


def _result(result: Any, n: int) -> dict[str, Any]:
    return {"role": "tool", "tool_call_id": f"call_{n}", "content": json.dumps(result, ensure_ascii=False)}


def _say(text: str) -> dict[str, Any]:
    return {"role": "assistant", "content": text}


class _Ctx:
    """What one generated conversation knows: the random stream, the open note and the call counter."""

    def __init__(self, r: random.Random):
        self.r = r
        self.open_note = _note(r)
        self.n = r.randint(100, 999)


def _edit(c: _Ctx, behavior: str, tool: str, other: str, verb: str, where: str) -> list[dict[str, Any]]:
    r = c.r
    item = r.choice(_ITEMS)
    this = r.random() < 0.5
    path = c.open_note if this else _note(r)
    user = f"{verb} '{item}' {where} {'this note' if this else path}."
    if behavior == "no_call":
        return [{"role": "user", "content": user}, _say(f"Done: '{item}' is in {path}.")]
    name = other if behavior == "wrong_tool" else tool
    args = {"filePath": path, "content": item}
    if behavior == "wrong_arguments":
        args = {"filePath": _note(r) if this else c.open_note, "content": item.split()[0]}
    return [
        {"role": "user", "content": user},
        _call(name, args, c.n),
        _result({"ok": True, "filePath": args["filePath"]}, c.n),
        _say(
            f"Done: '{args['content']}' is now {'at the end' if name == 'append_content' else 'at the top'} of {args['filePath']}."
        ),
    ]


def _append(c: _Ctx, behavior: str) -> list[dict[str, Any]]:
    return _edit(c, behavior, "append_content", "prepend_content", "Append", "to")


def _prepend(c: _Ctx, behavior: str) -> list[dict[str, Any]]:
    return _edit(c, behavior, "prepend_content", "append_content", "Prepend", "to")


def _search(c: _Ctx, behavior: str) -> list[dict[str, Any]]:
    r = c.r
    topic = r.choice(_TOPICS)
    user = f"Search my notes for {topic}."
    hits = sorted({f"{f}/{topic}.md" for f in r.sample(_FOLDERS, r.randint(1, 3))})
    if behavior == "no_call":
        return [{"role": "user", "content": user}, _say(f"You have no notes about {topic}.")]
    name, args = "search_notes", {"query": topic}
    if behavior == "wrong_tool":
        name, args = "read_note", {"filePath": f"{topic}.md"}
    elif behavior == "wrong_arguments":
        args = {"query": r.choice([t for t in _TOPICS if t != topic])}
    return [
        {"role": "user", "content": user},
        _call(name, args, c.n),
        _result({"results": hits}, c.n),
        _say(f"I found {len(hits)} note{'s' if len(hits) > 1 else ''} about {topic}: {', '.join(hits)}."),
    ]


def _read(c: _Ctx, behavior: str) -> list[dict[str, Any]]:
    r = c.r
    this = r.random() < 0.5
    path = c.open_note if this else _note(r)
    items = r.sample(_ITEMS, 2)
    user = f"Read {'this note' if this else path} and tell me what it says."
    if behavior == "no_call":
        return [{"role": "user", "content": user}, _say(f"{path} is empty.")]
    name, args = "read_note", {"filePath": path}
    if behavior == "wrong_tool":
        name, args = "search_notes", {"query": path}
    elif behavior == "wrong_arguments":
        args = {"filePath": _note(r) if this else c.open_note}
    text = f"- {items[0]}\n- {items[1]}"
    return [
        {"role": "user", "content": user},
        _call(name, args, c.n),
        _result({"filePath": path, "content": text}, c.n),
        _say(f"{path} lists two things: {items[0]} and {items[1]}."),
    ]


def _create(c: _Ctx, behavior: str) -> list[dict[str, Any]]:
    r = c.r
    path = f"{r.choice(_FOLDERS)}/{r.choice(_TOPICS)}-{r.randint(2, 99)}.md"
    item = r.choice(_ITEMS)
    user = f"Create a note {path} with '{item}'."
    if behavior == "no_call":
        return [{"role": "user", "content": user}, _say(f"I created {path}.")]
    name, args = "create_note", {"filePath": path, "content": item}
    if behavior == "wrong_tool":
        name = "append_content"
    elif behavior == "wrong_arguments":
        args = {"filePath": path.rsplit("/", 1)[1], "content": item}
    return [
        {"role": "user", "content": user},
        _call(name, args, c.n),
        _result({"ok": True, "filePath": args["filePath"]}, c.n),
        _say(f"Created {args['filePath']} with '{item}'."),
    ]


def _chat(c: _Ctx, behavior: str) -> list[dict[str, Any]]:
    question, answer = c.r.choice(_CHAT)
    if behavior == "unneeded_call":
        return [
            {"role": "user", "content": question},
            _call("search_notes", {"query": question.rstrip("?!.").split()[-1].lower()}, c.n),
            _result({"results": []}, c.n),
            _say("I found nothing."),
        ]
    return [{"role": "user", "content": question}, _say(answer)]


# (kind, its category, the behaviours an undesirable record of that kind picks from)
_KINDS: list[tuple[Callable[[_Ctx, str], list[dict[str, Any]]], str, tuple[str, ...]]] = [
    (_append, "append", ("wrong_tool", "wrong_arguments", "no_call")),
    (_prepend, "prepend", ("wrong_tool", "wrong_arguments", "no_call")),
    (_search, "search", ("wrong_tool", "wrong_arguments", "no_call")),
    (_read, "read", ("wrong_tool", "wrong_arguments", "no_call")),
    (_create, "create", ("wrong_tool", "wrong_arguments", "no_call")),
    (_chat, "chat", ("unneeded_call",)),
]


def tool_sample_records(
    n: int = 300, seed: int = 42, undesirable_share: float = 0.25
) -> Iterator[dict[str, Any]]:
    """``n`` distinct tool-use records, deterministic for a seed; about ``undesirable_share`` labelled false.

    About one in six records is a request answered in text (no tool needed)."""
    r = random.Random(seed)
    seen: set[str] = set()
    i = 0
    while len(seen) < n:
        kind, category, bad = _KINDS[i % len(_KINDS)]
        i += 1
        good = r.random() >= undesirable_share
        behavior = "correct" if good else r.choice(bad)
        c = _Ctx(r)
        turns = kind(c, behavior)
        rec = {
            "conversations": [_system(r.choice(_DATES), c.open_note), *turns],
            "tools": TOOLS,
            "label": good,
            "behavior": behavior,
            "pattern": "call_then_answer" if any("tool_calls" in t for t in turns) else "text_only",
            "category": category,
        }
        key = json.dumps(rec["conversations"], sort_keys=True)
        if key in seen:  # `ft dataset prepare` would drop (and report) exact duplicates
            continue
        seen.add(key)
        yield rec


def tool_sample_jsonl(n: int = 300, seed: int = 42) -> str:
    return "".join(json.dumps(rec, ensure_ascii=False) + "\n" for rec in tool_sample_records(n, seed))
