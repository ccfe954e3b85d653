"""Tool calling through `ft serve` with the official `openai` client: a run tuned (in the test) to call a
weather tool gets `tool_calls` back with finish_reason "tool_calls", answers in text once the tool result
is sent, and streams the call as OpenAI's tool-call deltas. The embedded SmolLM2's template has no tool
support, so tools go through ft's fallback (the rendering training uses)."""

from __future__ import annotations

import json

import pytest

from serve_helpers import (
    BASE,
    TOOL_ANSWER,
    TOOL_QUESTION,
    TOOL_RUN,
    WEATHER_TOOL,
    add_tool_run,
    make_workspace,
    start_server,
    tool_history,
)

openai = pytest.importorskip("openai")

pytestmark = [pytest.mark.e2e, pytest.mark.slow]


@pytest.fixture(scope="module")
def client(tmp_path_factory, smollm2_dir):
    tmp = tmp_path_factory.mktemp("serve-tools")
    ws = make_workspace(tmp / "ws", smollm2_dir)
    final_loss = add_tool_run(ws)
    assert final_loss < 0.1, final_loss
    server = start_server(ws, tmp, "--model", TOOL_RUN)
    try:
        yield openai.OpenAI(base_url=server.v1, api_key="unused", max_retries=0, timeout=300)
    finally:
        server.stop()


def test_a_request_with_tools_gets_tool_calls_then_a_text_answer(client):
    r = client.chat.completions.create(
        model=TOOL_RUN, messages=TOOL_QUESTION, tools=[WEATHER_TOOL], temperature=0, max_tokens=64
    )
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls", choice
    (call,) = choice.message.tool_calls
    assert call.type == "function" and call.function.name == "get_weather" and call.id
    assert json.loads(call.function.arguments) == {"city": "Paris"}
    # the result goes back as a `tool` message after the assistant's call: a text answer comes
    history = [
        *TOOL_QUESTION,
        choice.message.model_dump(exclude_none=True),
        {"role": "tool", "tool_call_id": call.id, "content": "18 C and sunny"},
    ]
    final = client.chat.completions.create(
        model=TOOL_RUN, messages=history, tools=[WEATHER_TOOL], temperature=0, max_tokens=64
    )
    assert final.choices[0].finish_reason == "stop"
    assert final.choices[0].message.content == TOOL_ANSWER and not final.choices[0].message.tool_calls
    # tool_choice "none": the tools are not shown, so no call is parsed either
    plain = client.chat.completions.create(
        model=TOOL_RUN, messages=TOOL_QUESTION, tools=[WEATHER_TOOL], tool_choice="none", max_tokens=32
    )
    assert not plain.choices[0].message.tool_calls and plain.choices[0].finish_reason != "tool_calls"


def test_streamed_tool_calls_arrive_as_openai_deltas(client):
    stream = client.chat.completions.create(
        model=TOOL_RUN,
        messages=TOOL_QUESTION,
        tools=[WEATHER_TOOL],
        temperature=0,
        max_tokens=64,
        stream=True,
    )
    chunks = [c for c in stream if c.choices]
    content = "".join(c.choices[0].delta.content or "" for c in chunks)
    assert "<tool_call>" not in content  # the call's text is not streamed as content
    calls = [tc for c in chunks for tc in (c.choices[0].delta.tool_calls or [])]
    assert calls[0].index == 0 and calls[0].id and calls[0].type == "function"
    assert calls[0].function.name == "get_weather" and calls[0].function.arguments == ""
    args = "".join(tc.function.arguments or "" for tc in calls if tc.function)
    assert json.loads(args) == {"city": "Paris"}
    assert chunks[-1].choices[0].finish_reason == "tool_calls"
    # streaming the answer after the result: plain content, finish "stop"
    stream = client.chat.completions.create(
        model=TOOL_RUN,
        messages=tool_history("call_9"),
        tools=[WEATHER_TOOL],
        temperature=0,
        max_tokens=64,
        stream=True,
    )
    chunks = [c for c in stream if c.choices]
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == TOOL_ANSWER
    assert chunks[-1].choices[0].finish_reason == "stop"


def test_the_base_model_takes_tools_through_the_fallback_and_bad_histories_are_refused(client):
    r = client.chat.completions.create(
        model=BASE, messages=TOOL_QUESTION, tools=[WEATHER_TOOL], temperature=0, max_tokens=8
    )
    assert r.choices[0].finish_reason in ("stop", "length", "tool_calls")
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(
            model=BASE, messages=tool_history("c1", arguments="{not json"), tools=[WEATHER_TOOL], max_tokens=4
        )
    assert e.value.param == "messages" and "JSON" in e.value.message
