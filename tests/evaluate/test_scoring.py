"""Answer normalization, multiple-choice parsing and metric aggregation on hand-written cases."""

from __future__ import annotations

import math

import pytest

from pipeline.evaluate import scoring as S

NORMALIZE = [
    ("Yes", "yes"),
    ("  YES.  ", "yes"),
    ("Two", "2"),
    ("two dogs", "2 dogs"),
    ("The cat", "cat"),
    ("a red ball!", "red ball"),
    ("An apple", "apple"),
    ("1,000", "1000"),
    ("12,345,678", "12345678"),
    ("1,2", "1 2"),  # not a thousands separator: a comma inside a word becomes a space
    ("2.5", "2.5"),
    ("3.", "3"),
    ("t-shirt", "t shirt"),
    ("left - right", "left right"),
    ("dont", "don't"),
    ("isnt it", "isn't it"),
    ("its", "its"),  # ambiguous: left alone
    ("(blue)", "blue"),
    ("red/white", "red white"),
    ("Line one\nline two", "line 1 line 2"),
    ("ten", "10"),
    ("eleven", "eleven"),  # only zero..ten become digits
    ("Mr. Smith", "mr smith"),
    ("", ""),
]


@pytest.mark.parametrize("text,expected", NORMALIZE)
def test_normalize_vqa_answer(text, expected):
    assert S.normalize_vqa_answer(text) == expected


def test_exact_match_and_consensus():
    refs = ["two", "2", "2", "two ", "3", "three", "2", "2", "two", "2"]
    assert S.exact_match("2", refs) == 1.0
    assert S.exact_match("Two.", ["2"]) == 1.0
    assert S.exact_match("4", refs) == 0.0
    assert S.consensus_accuracy("3", refs) == pytest.approx(2 / 3)  # "3" and "three"
    assert S.consensus_accuracy("2", refs) == 1.0
    assert S.consensus_accuracy("5", refs) == 0.0


OPTIONS = ["mammal", "bird", "fish", "reptile"]
CHOICES = [
    # (model output, number of choices, expected index or None)
    ("B", 4, 1),
    ("b", 4, 1),
    ("(C)", 4, 2),
    ("D.", 4, 3),
    ("A)", 4, 0),
    ("B. bird", 4, 1),
    ("(C) fish", 4, 2),
    ("A: mammal", 4, 0),
    ("The answer is B.", 4, 1),
    ("answer: (c)", 4, 2),
    ("Answer:D", 4, 3),
    ("The correct option is C", 4, 2),
    ("**B**", 4, 1),
    ("E", 4, None),  # letter outside the offered options
    ("The answer is E.", 4, None),
    ("A dog", 4, None),  # the article, not option A
    ("I think so", 4, None),
    ("", 4, None),
    ("   ", 4, None),
    ("B or C", 4, None),  # two candidates: no rule reads it
    ("fish", 4, 2),  # exactly one option's text
    ("The Fish.", 4, 2),  # same after normalization
    ("a fish or a bird", 4, None),
    ("answer is a cat", 4, None),  # lower-case article after "answer is"
    ("C", 2, None),  # only A and B offered
]


@pytest.mark.parametrize("text,n,expected", CHOICES)
def test_parse_choice(text, n, expected):
    assert S.parse_choice(text, n, OPTIONS[:n]) == expected


def test_parse_choice_without_option_texts():
    assert S.parse_choice("fish", 4) is None
    assert S.parse_choice("C", 4) == 2


def test_accuracy_metrics_by_hand():
    recs = [{"correct": 1.0, "group": "a"}, {"correct": 0.0, "group": "a"}, {"correct": 1.0, "group": "b"},
            {"correct": 1.0, "group": None, "parsed": 1.0}, {"correct": 0.0, "parsed": 0.0}]
    m = S.accuracy_metrics(recs)
    assert m["accuracy"] == pytest.approx(3 / 5)
    assert m["n"] == 5
    assert m["per_group"] == {"a": 0.5, "b": 1.0}
    assert m["parsed_rate"] == 0.5


def test_perplexity_metrics_by_hand():
    recs = [{"nll": 2.0, "tokens": 1}, {"nll": 4.0, "tokens": 3}]
    m = S.perplexity_metrics(recs)
    assert m["tokens"] == 4
    assert m["perplexity"] == pytest.approx(math.exp(1.5))
    assert math.isnan(S.perplexity(0.0, 0))


def test_fidelity_metrics_token_weighted():
    a = {"answer": {"kl": 0.1, "top1": 1.0, "tokens": 1, "nll_fp": 1.0, "nll_q": 2.0},
         "text": {"kl": 0.0, "top1": 1.0, "tokens": 0, "nll_fp": 0.0, "nll_q": 0.0}}
    b = {"answer": {"kl": 0.4, "top1": 0.5, "tokens": 3, "nll_fp": 3.0, "nll_q": 6.0},
         "text": {"kl": 0.2, "top1": 0.0, "tokens": 2, "nll_fp": 1.0, "nll_q": 1.0}}
    m = S.fidelity_metrics([a, b])
    assert m["answer"]["kl"] == pytest.approx((0.1 + 1.2) / 4)
    assert m["answer"]["top1"] == pytest.approx(2.5 / 4)
    assert m["answer"]["ppl_fp"] == pytest.approx(math.exp(4.0 / 4))
    assert m["answer"]["ppl_quant"] == pytest.approx(math.exp(8.0 / 4))
    assert m["text"]["tokens"] == 2 and m["text"]["kl"] == pytest.approx(0.2)
