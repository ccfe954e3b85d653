"""Chat templates in the sandbox, and the loss mask checked token by token on the embedded tokenizer."""

from __future__ import annotations

import numpy as np
import pytest

from ft.data.formats import Example, Format
from ft.data.templates import NAMED, ChatTemplate, make_template
from ft.data.tokenize import Encoded, TextTokenizer, encode_examples
from ft.data.validate import Reason, RecordError
from ft.errors import FtError

CONV = (
    ("system", "You answer in French."),
    ("user", "Hello, how are you?"),
    ("assistant", "Très bien, merci ! 🙂\nEt vous ?"),
    ("user", " Two spaces  and\ttabs <b>"),
    ("assistant", "Digits 12345, <i>tags</i> and a trailing space "),
)


def as_messages(pairs) -> tuple[dict, ...]:
    """(role, content) pairs as the normalized message dicts of ft.data.formats."""
    return tuple({"role": r, "content": c} for r, c in pairs)


def chat_example(messages=CONV, label=-1) -> Example:
    return Example(Format.CHAT, as_messages(messages), None, label)


def encode_one(tok, template, ex, train_on="assistant") -> Encoded:
    (out,) = encode_examples([ex], tok, template, train_on)
    assert isinstance(out, Encoded), out
    return out


def expected_pieces(messages):
    """SmolLM2's ChatML, written out by hand: (text, trained) pieces in order."""
    pieces = []
    for role, content in messages:
        if role == "assistant":
            pieces += [("<|im_start|>assistant\n", False), (content + "<|im_end|>\n", True)]
        else:
            pieces += [(f"<|im_start|>{role}\n{content}<|im_end|>\n", False)]
    return pieces


def test_model_template_matches_transformers_rendering(smollm2_tokenizer):
    tok = smollm2_tokenizer
    tmpl = make_template("model", tok.chat_template, tok.special)
    msgs = [{"role": r, "content": c} for r, c in CONV]
    assert tmpl.render(as_messages(CONV)) == tok.hf.apply_chat_template(msgs, tokenize=False)
    assert tmpl.render(as_messages(CONV[:2]), add_generation_prompt=True) == tok.hf.apply_chat_template(
        msgs[:2], tokenize=False, add_generation_prompt=True
    )


def reference(tok) -> TextTokenizer:
    """The same tokenizer without the tiktoken fast path (Hugging Face offsets only)."""
    ref = TextTokenizer.from_hf(tok.hf)
    ref.use_fast = False
    return ref


@pytest.mark.parametrize("path", ["exact", "one-render", "reference-tokenizer"])
def test_mask_covers_exactly_the_assistant_tokens_token_by_token(smollm2_tokenizer, path):
    tok = smollm2_tokenizer if path != "reference-tokenizer" else reference(smollm2_tokenizer)
    tmpl = make_template("model", tok.chat_template, tok.special)
    if path == "one-render":
        tmpl._layout_checks = 0  # skip the warm-up comparison: use the learned layout alone
    enc = encode_one(tok, tmpl, chat_example())

    # Independent expectation: encode each piece alone; the pieces meet at token boundaries in ChatML.
    exp_ids: list[int] = []
    exp_mask: list[bool] = []
    for text, trained in expected_pieces(CONV):
        ids = tok.backend.encode(text, add_special_tokens=False).ids
        exp_ids += ids
        exp_mask += [trained] * len(ids)
    assert enc.ids.tolist() == exp_ids
    rows = [
        f"{i:3} {tok.decode([t])!r:24} got={int(m)} want={int(w)}"
        for i, (t, m, w) in enumerate(zip(enc.ids.tolist(), enc.mask.tolist(), exp_mask, strict=True))
    ]
    assert enc.mask.tolist() == exp_mask, "\n".join(
        r for r in rows if "got=0 want=1" in r or "got=1 want=0" in r
    )
    # And read back: the trained runs are the two replies with their end-of-turn marker.
    runs = _runs(tok, enc)
    assert runs == [CONV[2][1] + "<|im_end|>\n", CONV[4][1] + "<|im_end|>\n"]


def test_mask_when_a_token_straddles_the_start_of_a_reply(smollm2_tokenizer):
    """A reply starting with spaces: BPE merges the template's newline with the first space.

    The whole conversation is tokenized at once (the ids the model sees at inference); a token
    belongs to the span its first character is in, so the straddling token stays context.
    """
    tok = smollm2_tokenizer
    tmpl = make_template("model", tok.chat_template, tok.special)
    conv = (("system", "s"), ("user", "q"), ("assistant", "  two leading spaces"))
    enc = encode_one(tok, tmpl, chat_example(conv))
    text = "".join(t for t, _ in expected_pieces(conv))
    start = text.index("  two")
    full = tok.backend.encode(text, add_special_tokens=False)
    assert enc.ids.tolist() == full.ids
    want = [start <= s < len(text) for s, _ in full.offsets]
    assert enc.mask.tolist() == want
    assert _runs(tok, enc) == [" two leading spaces<|im_end|>\n"]


def _runs(tok, enc: Encoded) -> list[str]:
    out, cur = [], []
    for t, m in zip(enc.ids.tolist(), enc.mask.tolist(), strict=True):
        if m:
            cur.append(t)
        elif cur:
            out.append(tok.decode(cur))
            cur = []
    if cur:
        out.append(tok.decode(cur))
    return out


@pytest.mark.parametrize("path", ["exact", "one-render"])
def test_train_on_last_and_all(smollm2_tokenizer, path):
    tok = smollm2_tokenizer
    tmpl = make_template("model", tok.chat_template, tok.special)
    if path == "one-render":
        tmpl._layout_checks = 0
    last = encode_one(tok, tmpl, chat_example(), "last")
    assert _runs(tok, last) == [CONV[4][1] + "<|im_end|>\n"]
    # the same reply twice: the last turn is the last one, not the first match
    twice = (("system", "s"), ("user", "a?"), ("assistant", "Yes."), ("user", "b?"), ("assistant", "Yes."))
    enc = encode_one(tok, tmpl, chat_example(twice), "last")
    assert _runs(tok, enc) == ["Yes.<|im_end|>\n"]
    assert "b?" in tok.decode(enc.ids[: enc.mask.argmax()])  # the trained run comes after the second question
    everything = encode_one(tok, tmpl, chat_example(), "all")
    assert everything.mask.all()


def test_plain_text_trains_every_token_and_ends_with_eos(smollm2_tokenizer):
    tok = smollm2_tokenizer
    enc = encode_one(tok, None, Example(Format.TEXT, None, "Some text.", -1))
    assert enc.mask.all()
    assert tok.decode(enc.ids) == "Some text." + tok.eos_token


@pytest.mark.parametrize("name", sorted(NAMED))
def test_named_fallback_templates_mask_the_replies(smollm2_tokenizer, name):
    tok = smollm2_tokenizer
    tmpl = make_template(name, None, tok.special)
    enc = encode_one(tok, tmpl, chat_example())
    runs = _runs(tok, enc)
    assert len(runs) == 2
    for run, reply in zip(runs, (CONV[2][1], CONV[4][1]), strict=True):
        assert reply.strip() in run
        assert tok.eos_token in run  # the model learns to stop
        assert "user" not in run.lower() or name == "chatml"


def test_model_without_template_needs_a_fallback_for_chat_but_not_for_text(smollm2_tokenizer):
    tmpl = make_template("model", None, smollm2_tokenizer.special)
    (text,) = encode_examples([Example(Format.TEXT, None, "plain", -1)], smollm2_tokenizer, tmpl)
    assert isinstance(text, Encoded)
    with pytest.raises(FtError, match="no chat template") as err:
        encode_examples([chat_example()], smollm2_tokenizer, tmpl)
    assert "--template chatml" in (err.value.hint or "")


@pytest.mark.parametrize(
    "evil",
    [
        "{{ ''.__class__.__mro__[1].__subclasses__() }}",
        "{{ messages.__class__ }}",
        "{{ raise_exception.__globals__ }}",
        "{{ messages.append(1) }}",
        "{{ messages[0].__class__ }}",
        "{{ messages[0].update({'role': 'x'}) }}",
        "{{ messages[0].__init__.__globals__ }}",
    ],
)
def test_template_reaching_python_internals_is_stopped_by_the_sandbox(evil):
    tmpl = ChatTemplate(evil, "model", {})
    with pytest.raises(FtError, match="sandbox") as err:
        tmpl.render(as_messages([("user", "q"), ("assistant", "a")]))
    assert "--template" in (err.value.hint or "")


def test_template_errors_reject_the_record_not_the_run(smollm2_tokenizer):
    strict = ChatTemplate(
        "{% if messages|length > 2 %}{{ raise_exception('only one exchange') }}{% endif %}"
        "{% for m in messages %}{{ m.content }}{% endfor %}",
        "model",
        {},
    )
    ok, bad = encode_examples([chat_example(CONV[1:3]), chat_example()], smollm2_tokenizer, strict)
    assert isinstance(ok, Encoded)
    assert (
        isinstance(bad, RecordError)
        and bad.reason is Reason.TEMPLATE_ERROR
        and "only one exchange" in bad.message
    )


def test_template_that_rewrites_history_falls_back_to_finding_the_reply(smollm2_tokenizer):
    # Renders a marker only on the generation prompt, so prefixes do not line up.
    odd = ChatTemplate(
        "{% for m in messages %}[{{ m.role }}] {{ m.content }}{% if m.role == 'assistant' %}"
        "{{ eos_token }}{% endif %}\n{% endfor %}{% if add_generation_prompt %}[assistant]*{% endif %}",
        "model",
        smollm2_tokenizer.special,
    )
    enc = encode_one(smollm2_tokenizer, odd, chat_example(CONV[1:3]))
    assert _runs(smollm2_tokenizer, enc) == [" " + CONV[2][1] + smollm2_tokenizer.eos_token]
    assert np.count_nonzero(enc.mask) < len(enc.mask)


def _corpus() -> list[Example]:
    import random

    r = random.Random(3)
    pieces = [
        "Hello",
        " world",
        "!",
        " 12345",
        "  ",
        "\n",
        "\t",
        "é",
        "日本",
        "🙂",
        "<|im_end|>",
        "'s",
        " don't",
        "x" * 40,
        " CamelCase",
        "__init__",
        "\r\n",
        "—",
        " 3.14159",
        "<b>",
        "  \n  ",
    ]
    out = []
    for _ in range(300):
        turns = []
        for _k in range(r.randint(1, 3)):
            turns += [
                ("user", "".join(r.choice(pieces) for _ in range(r.randint(1, 12))).strip() or "q"),
                ("assistant", "".join(r.choice(pieces) for _ in range(r.randint(1, 12))).strip() or "a"),
            ]
        out.append(chat_example(turns))
    out.append(Example(Format.TEXT, None, "".join(pieces), -1))
    return out


@pytest.mark.parametrize("train_on", ["assistant", "last"])
def test_fast_encoder_gives_the_reference_ids_and_masks(smollm2_tokenizer, train_on):
    tok = smollm2_tokenizer
    assert tok.fast_encoder() is not None  # SmolLM2's byte-level BPE qualifies
    ref = reference(tok)
    corpus = _corpus()
    fast = encode_examples(corpus, tok, make_template("model", tok.chat_template, tok.special), train_on)
    slow = encode_examples(corpus, ref, make_template("model", tok.chat_template, tok.special), train_on)
    for i, (a, b) in enumerate(zip(fast, slow, strict=True)):
        assert a.ids.tolist() == b.ids.tolist(), i
        assert a.mask.tolist() == b.mask.tolist(), i


def test_fast_path_disagreement_falls_back_to_the_reference(smollm2_tokenizer, tmp_path, monkeypatch):
    import json

    from ft.data.fastbpe import FastBPE
    from ft.data.prepare import PrepareOptions, prepare
    from ft.data.readers import open_source
    from ft.data.store import load_split

    tok = TextTokenizer.from_hf(smollm2_tokenizer.hf)
    real = FastBPE.encode_batch

    def wrong(self, texts):
        ids = real(self, texts)
        return [[*x[:-1], 0] for x in ids]  # a different last token everywhere

    monkeypatch.setattr(FastBPE, "encode_batch", wrong)
    src = tmp_path / "d.jsonl"
    src.write_text("".join(json.dumps({"prompt": f"q{i}", "completion": f"a{i}"}) + "\n" for i in range(300)))
    (tmp_path / "out").mkdir()
    prepare(
        open_source(src),
        tok,
        make_template("model", tok.chat_template, tok.special),
        PrepareOptions(val_split=0.0),
        tmp_path / "out",
    )
    assert tok.fast is None  # switched off after the first sampled disagreement
    split = load_split(tmp_path / "out" / "train.safetensors")
    ref = smollm2_tokenizer.backend.encode(tok.decode(split.tokens(0)), add_special_tokens=False).ids
    assert split.tokens(0).tolist() == ref and split.tokens(0)[-1] != 0


CONTROL = "\x04\x06\x13\x14\x16\x1d"  # characters SmolLM2's vocabulary has no token for


def _control_corpus(n: int) -> list[str]:
    return [f"record {i}: before{CONTROL[i % len(CONTROL)]}after {CONTROL} end" for i in range(n)]


@pytest.mark.parametrize("n", [10, 300])  # below and above the fast path's batch threshold
def test_characters_the_vocabulary_lacks_tokenize_as_the_hugging_face_tokenizer_does(smollm2_tokenizer, n):
    tok = TextTokenizer.from_hf(smollm2_tokenizer.hf)
    assert tok.lacking is not None and all(tok.lacking.search(c) for c in CONTROL)
    texts = _control_corpus(n)
    examples = [chat_example((("user", "q"), ("assistant", t))) for t in texts]
    template = make_template("model", tok.chat_template, tok.special)
    out = encode_examples(examples, tok, template)
    for ex, enc in zip(examples, out, strict=True):
        want = tok.hf.apply_chat_template(list(ex.messages), tokenize=True)
        want = getattr(want, "input_ids", want)
        assert enc.ids.tolist() == list(want)
        assert set(enc.dropped) <= set(CONTROL) and enc.dropped
        trained = tok.decode(enc.ids[enc.mask])
        assert (
            trained == ex.messages[1]["content"].translate({ord(c): None for c in CONTROL}) + "<|im_end|>\n"
        )


def test_prepare_of_300_records_with_control_characters_reports_them(smollm2_tokenizer, tmp_path):
    import json

    from ft.data.prepare import PrepareOptions, prepare
    from ft.data.readers import open_source

    tok = TextTokenizer.from_hf(smollm2_tokenizer.hf)
    src = tmp_path / "d.jsonl"
    rows = [{"prompt": f"q{i}", "completion": t} for i, t in enumerate(_control_corpus(150))]
    rows += [{"prompt": f"plain {i}", "completion": f"answer {i}"} for i in range(150)]
    src.write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "out").mkdir()
    stats = prepare(
        open_source(src),
        tok,
        make_template("model", tok.chat_template, tok.special),
        PrepareOptions(val_split=0.0),
        tmp_path / "out",
    )
    assert stats.kept == 300
    assert stats.dropped_chars == {f"U+{ord(c):04X}": 150 for c in CONTROL}
