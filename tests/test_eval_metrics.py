"""Text metrics on handcrafted pairs (answers worked out by hand), and prompt/reference cutting."""

from __future__ import annotations

import numpy as np
import pytest

from ft.data import metrics as m
from ft.engine.batching import ArrayExamples


@pytest.mark.parametrize(
    ("pred", "ref", "em", "nem"),
    [
        ("Paris", "Paris", 1.0, 1.0),
        ("  Paris\n", "Paris", 1.0, 1.0),  # leading/trailing whitespace does not count
        ("paris", "Paris", 0.0, 1.0),  # case counts for EM only
        ("The  capital\tis Paris.", "the capital is paris.", 0.0, 1.0),  # inner whitespace runs collapse
        ("Paris.", "Paris", 0.0, 0.0),  # punctuation counts for both
        ("ﬁne", "fine", 0.0, 1.0),  # NFKC: the ligature is "fi"
        ("", "", 1.0, 1.0),
        ("Paris", "", 0.0, 0.0),
    ],
)
def test_exact_match_and_normalized(pred: str, ref: str, em: float, nem: float) -> None:
    assert m.exact_match(pred, ref) == em
    assert m.normalized_exact_match(pred, ref) == nem


def test_token_f1_by_hand() -> None:
    # pred words: the cat sat on the mat (6); ref: the cat is on the mat (6); overlap with multiplicity:
    # the x2, cat, on, mat = 5 -> P = R = 5/6 -> F1 = 5/6
    assert m.token_f1("The cat sat on the mat.", "the cat is on the mat") == pytest.approx(5 / 6)
    # pred: a a b (3); ref: a b b c (4); overlap: a x1, b x1 = 2 -> P 2/3, R 1/2 -> F1 = 2PR/(P+R) = 4/7
    assert m.token_f1("a a b", "a b b c") == pytest.approx(4 / 7)
    assert m.token_f1("Paris!", "paris") == 1.0  # punctuation dropped, case folded
    assert m.token_f1("Berlin", "Paris") == 0.0
    assert m.token_f1("", "") == 1.0
    assert m.token_f1("", "Paris") == 0.0
    assert m.token_f1("2 + 3 = 5.", "2 + 3 = 6.") == pytest.approx(2 * (2 / 3) * (2 / 3) / (4 / 3))


def test_rouge_l_by_hand() -> None:
    # The ROUGE paper's example: LCS("police killed the gunman", "police kill the gunman") = police, the,
    # gunman = 3 words of 4 on each side -> P = R = 3/4
    assert m.rouge_l("police killed the gunman", "police kill the gunman") == pytest.approx(0.75)
    # word order matters for ROUGE-L but not for F1
    assert m.token_f1("b a", "a b") == 1.0
    assert m.rouge_l("b a", "a b") == pytest.approx(0.5)
    assert m.lcs_length(list("ABCBDAB"), list("BDCABA")) == 4  # the textbook LCS example
    assert m.rouge_l("", "") == 1.0
    assert m.rouge_l("x", "") == 0.0


def test_score_and_mean() -> None:
    s = m.score_text("The capital of France is Paris.", "The capital of France is Paris.")
    assert s.as_dict() == {"exact_match": 1.0, "normalized_exact_match": 1.0, "token_f1": 1.0, "rouge_l": 1.0}
    avg = m.mean_scores([s, m.score_text("no", "yes")])
    assert avg is not None and avg.exact_match == 0.5 and avg.token_f1 == 0.5
    assert m.mean_scores([]) is None


def test_last_turn_and_prompt_cases() -> None:
    # system/user (untrained) | reply 1 (trained) | user (untrained) | reply 2 (trained)
    mask = np.array([0, 0, 0, 1, 1, 0, 0, 1, 1, 1], dtype=bool)
    assert m.last_turn(np.arange(10), mask) == (7, 10)
    assert m.last_turn(np.arange(3), np.array([0, 0, 0], bool)) is None  # nothing trained
    assert m.last_turn(np.arange(3), np.array([1, 1, 1], bool)) is None  # plain text: no prompt
    data = ArrayExamples(
        [np.arange(10), np.arange(3), np.arange(20, 26)],
        [mask, np.ones(3, bool), np.array([0, 0, 1, 1, 0, 0], bool)],
    )
    cases = m.prompt_cases(data, n=5)
    assert [c.index for c in cases] == [0, 2]
    assert cases[0].prompt.tolist() == list(range(7)) and cases[0].reference.tolist() == [7, 8, 9]
    assert cases[1].prompt.tolist() == [20, 21] and cases[1].reference.tolist() == [22, 23]
    assert len(m.prompt_cases(data, n=1)) == 1


def test_cutting_at_stops_and_end_of_turn() -> None:
    assert m.cut_at_stop([5, 6, 2, 7], {2}) == [5, 6]
    assert m.cut_text("Paris.<|im_end|>\nmore", ["<|im_end|>"]) == "Paris."
    assert m.cut_text("Paris.", ["", "<|im_end|>"]) == "Paris."

    from ft.data.templates import CHATML, LLAMA2, ChatTemplate

    assert m.end_of_turn(ChatTemplate(CHATML, "chatml").render) == "<|im_end|>"
    assert (
        m.end_of_turn(ChatTemplate(LLAMA2, "llama2", {"bos_token": "<s>", "eos_token": "</s>"}).render)
        == "</s>"
    )
