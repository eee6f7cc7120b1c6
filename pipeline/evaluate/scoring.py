"""Scoring, as pure functions: answer normalization, multiple-choice parsing, metric aggregation.

Everything here is deterministic and model-free, so a task's score can be recomputed from the
per-example records the fleet stores (``DIR/items/*.json``) and tested on hand-written tables.

Open-ended answers (VQAv2-style normalization, :func:`normalize_vqa_answer`), in order:
lower case; newlines/tabs to spaces; thousands separators inside numbers dropped (``1,000`` ->
``1000``); a period is kept only between two digits (``2.5``); every other punctuation mark
is deleted when it touches a space or an end of the text, and becomes a space inside a word
(``t-shirt`` -> ``t shirt``); then per word: number words zero..ten become digits, the articles
a / an / the are dropped, and a few apostrophe-less contractions get their apostrophe back
(``dont`` -> ``don't``). Words are joined by single spaces.

Multiple choice (:func:`parse_choice`): the first rule that applies decides; an output no rule
reads is ``None``, which scores as wrong (never a random pick):

1. the whole output is one letter, optionally in brackets or followed by ``.``, ``:`` or ``)``
   (``B``, ``(b)``, ``c.``);
2. the output starts with a capital letter in brackets, or followed by ``.``, ``:`` or ``)``
   (``B. mammal``, ``(C) 42``, ``A) yes``); a bare ``A`` followed by a word is the article,
   not an option;
3. an explicit statement: ``answer``/``option``/``choice`` (any case), optionally ``is`` or
   ``:``, then a capital letter or a bracketed letter (``The answer is B.``, ``Answer: (c)``);
4. the output, normalized as an open-ended answer, equals exactly one option's normalized text.

A letter outside the offered options makes the output unparseable.
"""

from __future__ import annotations

import math
import re
from collections import defaultdict
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

NUMBER_WORDS = {"zero": "0", "one": "1", "two": "2", "three": "3", "four": "4", "five": "5", "six": "6",
                "seven": "7", "eight": "8", "nine": "9", "ten": "10"}
ARTICLES = frozenset({"a", "an", "the"})
# Contractions people type without the apostrophe. Ambiguous words ("its", "well", "were") are left alone.
CONTRACTIONS = {
    "dont": "don't", "doesnt": "doesn't", "didnt": "didn't", "isnt": "isn't", "arent": "aren't",
    "wasnt": "wasn't", "werent": "weren't", "cant": "can't", "couldnt": "couldn't", "shouldnt": "shouldn't",
    "wouldnt": "wouldn't", "hasnt": "hasn't", "havent": "haven't", "hadnt": "hadn't", "wont": "won't",
    "im": "i'm", "ive": "i've", "youre": "you're", "theyre": "they're", "thats": "that's",
    "whats": "what's", "theres": "there's", "hes": "he's", "shes": "she's", "lets": "let's",
}
# Punctuation handled by the touch-a-space rule; the apostrophe is kept (contractions), the
# period has its own digit rule.
PUNCTUATION = set(";/[]\"{}()=+\\_-><@`,?!:*#%^&$|~")

_THOUSANDS = re.compile(r"(?<=\d),(?=\d{3}(?!\d))")
_LETTERS = "ABCDEFGHIJKLMNOPQRSTUVWXYZ"


def normalize_vqa_answer(text: str) -> str:
    """VQAv2-style normalization of an open-ended answer (rules in the module docstring)."""
    s = str(text).replace("\n", " ").replace("\t", " ").strip().lower()
    s = _THOUSANDS.sub("", s)
    chars = []
    for i, ch in enumerate(s):
        if ch == ".":
            between_digits = 0 < i < len(s) - 1 and s[i - 1].isdigit() and s[i + 1].isdigit()
            chars.append("." if between_digits else "")
        elif ch in PUNCTUATION:
            touches_space = i == 0 or i == len(s) - 1 or s[i - 1] == " " or s[i + 1] == " "
            chars.append("" if touches_space else " ")
        else:
            chars.append(ch)
    words = []
    for w in "".join(chars).split():
        w = NUMBER_WORDS.get(w, w)
        if w in ARTICLES:
            continue
        words.append(CONTRACTIONS.get(w, w))
    return " ".join(words)


def exact_match(prediction: str, answers: Sequence[str]) -> float:
    """1.0 when the normalized prediction equals any normalized reference answer, else 0.0."""
    p = normalize_vqa_answer(prediction)
    return float(any(p == normalize_vqa_answer(a) for a in answers))


def consensus_accuracy(prediction: str, answers: Sequence[str]) -> float:
    """VQAv2's consensus form: ``min(#references equal to the prediction / 3, 1)`` (normalized).
    With one reference answer this is 1/3 or 0, so it is reported only for 3+ references."""
    p = normalize_vqa_answer(prediction)
    hits = sum(p == normalize_vqa_answer(a) for a in answers)
    return min(hits / 3.0, 1.0)


# ----------------------------------------------------------------------------- multiple choice

_BARE = re.compile(r"^\(?([A-Za-z])\)?[.:)]?$")
_LEADING = re.compile(r"^(?:\(([A-Z])\)|([A-Z])[.:)])(?:\s|$)")
_STATED = re.compile(r"(?i:answer|option|choice)\s*(?:(?i:is)\s*|:\s*)?(?:\(([A-Za-z])\)|([A-Z])(?![A-Za-z]))")


def choice_letter(index: int) -> str:
    return _LETTERS[index]


def letter_index(letter: str) -> int:
    return _LETTERS.index(letter.upper())


def parse_choice(text: str, n_choices: int, options: Sequence[str] | None = None) -> int | None:
    """The 0-based option an output names, or None when no rule reads it (module docstring)."""
    if not 1 <= n_choices <= len(_LETTERS):
        raise ValueError(f"n_choices must be in 1..{len(_LETTERS)}, got {n_choices}")
    s = str(text).strip().strip("*").strip().strip("'\"").strip()
    if not s:
        return None

    def pick(letter: str) -> int | None:
        i = letter_index(letter)
        return i if i < n_choices else None

    m = _BARE.match(s)
    if m:
        return pick(m.group(1))
    m = _LEADING.match(s)
    if m:
        return pick(m.group(1) or m.group(2))
    m = _STATED.search(s)
    if m:
        return pick(m.group(1) or m.group(2))
    if options:
        norm = normalize_vqa_answer(s)
        hits = [i for i, o in enumerate(options[:n_choices]) if norm and normalize_vqa_answer(o) == norm]
        if len(hits) == 1:
            return hits[0]
    return None


# ----------------------------------------------------------------------------- aggregation


def accuracy_metrics(records: Iterable[Mapping[str, Any]], group_key: str = "group") -> dict[str, Any]:
    """Mean of ``correct`` overall and per ``group`` (skill, subject, category) when present."""
    groups: dict[str, list[float]] = defaultdict(list)
    scores: list[float] = []
    extra: dict[str, list[float]] = defaultdict(list)
    for r in records:
        scores.append(float(r["correct"]))
        if r.get(group_key) is not None:
            groups[str(r[group_key])].append(float(r["correct"]))
        for k in ("consensus", "parsed"):
            if r.get(k) is not None:
                extra[k].append(float(r[k]))
    out: dict[str, Any] = {"accuracy": sum(scores) / len(scores) if scores else float("nan"), "n": len(scores)}
    if groups:
        out["per_group"] = {g: sum(v) / len(v) for g, v in sorted(groups.items())}
    if extra.get("consensus"):
        out["vqa_consensus"] = sum(extra["consensus"]) / len(extra["consensus"])
    if extra.get("parsed"):
        out["parsed_rate"] = sum(extra["parsed"]) / len(extra["parsed"])
    return out


def perplexity(nll_sum: float, tokens: int) -> float:
    """exp(mean negative log-likelihood per token); NaN for no tokens."""
    return math.exp(nll_sum / tokens) if tokens else float("nan")


def perplexity_metrics(records: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """Token-weighted perplexity over records ``{"nll": sum over tokens, "tokens": n}``."""
    recs = list(records)
    nll = sum(float(r["nll"]) for r in recs)
    tokens = sum(int(r["tokens"]) for r in recs)
    return {"perplexity": perplexity(nll, tokens), "nll_per_token": nll / tokens if tokens else float("nan"),
            "tokens": tokens, "n": len(recs)}


FIDELITY_MASKS = ("answer", "text")


def fidelity_metrics(records: Iterable[Mapping[str, Any]]) -> dict[str, Any]:
    """Token-weighted KL(fp||quant), top-1 agreement and both models' perplexities, per mask.

    Each record: ``{mask: {"kl", "top1", "tokens", "nll_fp", "nll_q"}}`` for one sample, where
    ``kl``/``top1`` are means over the sample's tokens and ``nll_*`` sums.
    """
    recs = list(records)
    out: dict[str, Any] = {"n": len(recs)}
    for m in FIDELITY_MASKS:
        parts = [r[m] for r in recs if m in r and r[m]["tokens"]]
        n = sum(p["tokens"] for p in parts)
        if not n:
            out[m] = {"kl": float("nan"), "top1": float("nan"), "tokens": 0,
                      "ppl_fp": float("nan"), "ppl_quant": float("nan")}
            continue
        out[m] = {
            "kl": sum(p["kl"] * p["tokens"] for p in parts) / n,
            "top1": sum(p["top1"] * p["tokens"] for p in parts) / n,
            "tokens": n,
            "ppl_fp": perplexity(sum(p["nll_fp"] for p in parts), n),
            "ppl_quant": perplexity(sum(p["nll_q"] for p in parts), n),
        }
    return out
