"""Answering tasks: the built-in synthetic VQA split, open-ended VQA files, multiple-choice files."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from .. import scoring
from .base import RunContext, Task, seeded
from .data import first, image_of, read_slice

VQA_SUFFIX = "\nAnswer the question using a single word or phrase."  # LLaVA-1.5's short-answer prompt
MC_SUFFIX = "\nAnswer with the option's letter from the given choices directly."
VQA_MAX_NEW_TOKENS = 16
MC_MAX_NEW_TOKENS = 8


@dataclass(frozen=True)
class BuiltinVQA(Task):
    """``builtin-vqa``: greedy answers on the synthetic test split (``evaluate.vqa``), per skill."""

    batch_size: int = 64

    def run(self, ctx: RunContext, start: int, stop: int) -> list[dict[str, Any]]:
        from ...data import synthetic
        from .. import vqa

        seeded(self.seed)
        samples = synthetic.generate_range("test", start, stop, self.seed)
        res = vqa.evaluate_builtin_vqa(ctx.model, ctx.processor, samples=samples, seed=self.seed,
                                       batch_size=self.batch_size, device=ctx.device, return_predictions=True)
        out = []
        for p in res["predictions"]:
            correct = vqa.score([p["prediction"]], [p["answer"]], [p["skill"]])["accuracy"]
            out.append({"id": p["id"], "group": p["skill"], "answer": p["answer"], "prediction": p["prediction"],
                        "correct": correct})
        return out

    def aggregate(self, records: list[dict[str, Any]]) -> dict[str, Any]:
        m = scoring.accuracy_metrics(records)
        m["per_skill"] = m.pop("per_group", {})
        m["seed"] = self.seed
        return m


@dataclass(frozen=True)
class OpenVQA(Task):
    """``vqa:FILE``: open-ended questions, normalized exact match against the reference answers."""

    def run(self, ctx: RunContext, start: int, stop: int) -> list[dict[str, Any]]:
        seeded(self.seed)
        root = Path(self.source).parent
        out = []
        for i, rec in enumerate(read_slice(self.source, start, stop, ctx.cache), start):
            rid = str(first(rec or {}, "question_id", "id") or i)
            if rec is None:
                out.append({"id": rid, "skipped": "malformed record"})
                continue
            image, problem = image_of(rec, root)
            question = first(rec, "question", "prompt")
            answers = rec.get("answers")
            if hasattr(answers, "tolist"):
                answers = answers.tolist()
            if answers is None and first(rec, "answer") is not None:
                answers = [rec["answer"]]
            answers = [a.get("answer", "") if isinstance(a, dict) else str(a) for a in (answers or [])]
            if problem or not question or not answers:
                out.append({"id": rid, "skipped": problem or ("no question" if not question else "no answers")})
                continue
            prompt = first(rec, "prompt") or str(question) + VQA_SUFFIX  # a row's own prompt is used verbatim
            pred = _answer(ctx, image, str(prompt), VQA_MAX_NEW_TOKENS)
            r = {"id": rid, "prediction": pred, "correct": scoring.exact_match(pred, answers),
                 "group": first(rec, "category", "question_type")}
            if len(answers) >= 3:
                r["consensus"] = scoring.consensus_accuracy(pred, answers)
            out.append(r)
        return out

    def aggregate(self, records: list[dict[str, Any]]) -> dict[str, Any]:
        scored = [r for r in records if "skipped" not in r]
        m = scoring.accuracy_metrics(scored)
        m["skipped"] = len(records) - len(scored)
        return m


def mc_prompt(question: str, choices: list[str], hint: str | None) -> str:
    """ScienceQA-style prompt: optional context, the question, lettered options, the instruction."""
    lines = [f"Context: {hint}"] if hint else []
    lines.append(question)
    lines += [f"{scoring.choice_letter(i)}. {c}" for i, c in enumerate(choices)]
    return "\n".join(lines) + MC_SUFFIX


def answer_index(answer: Any, n: int) -> int | None:
    """The reference answer as a 0-based index: an int index, or a letter."""
    if isinstance(answer, bool):
        return None
    if isinstance(answer, int):
        return answer if 0 <= answer < n else None
    s = str(answer).strip()
    if s.isdigit():
        return int(s) if int(s) < n else None
    if len(s) == 1 and s.isalpha() and scoring.letter_index(s) < n:
        return scoring.letter_index(s)
    return None


@dataclass(frozen=True)
class MultipleChoice(Task):
    """``mc:FILE``: ScienceQA-style multiple choice, scored by the parsed letter (unparseable = wrong)."""

    def run(self, ctx: RunContext, start: int, stop: int) -> list[dict[str, Any]]:
        seeded(self.seed)
        root = Path(self.source).parent
        out = []
        for i, rec in enumerate(read_slice(self.source, start, stop, ctx.cache), start):
            rid = str(first(rec or {}, "id", "question_id") or i)
            if rec is None:
                out.append({"id": rid, "skipped": "malformed record"})
                continue
            choices = rec.get("choices") or rec.get("options")
            choices = [str(c) for c in choices] if isinstance(choices, (list, tuple)) else []
            question = first(rec, "question", "prompt")
            gold = answer_index(rec.get("answer"), len(choices))
            image, problem = image_of(rec, root)
            if problem or not question or not 2 <= len(choices) <= 26 or gold is None:
                why = problem or ("no question" if not question else "need 2..26 choices" if not 2 <= len(choices) <= 26
                                  else "answer is not an index or letter of the choices")
                out.append({"id": rid, "skipped": why})
                continue
            pred = _answer(ctx, image, mc_prompt(str(question), choices, first(rec, "hint", "context")),
                           MC_MAX_NEW_TOKENS)
            idx = scoring.parse_choice(pred, len(choices), choices)
            out.append({"id": rid, "prediction": pred, "parsed": float(idx is not None),
                        "choice": None if idx is None else scoring.choice_letter(idx),
                        "answer": scoring.choice_letter(gold), "correct": float(idx == gold),
                        "group": first(rec, "subject", "category")})
        return out

    def aggregate(self, records: list[dict[str, Any]]) -> dict[str, Any]:
        scored = [r for r in records if "skipped" not in r]
        m = scoring.accuracy_metrics(scored)
        m["skipped"] = len(records) - len(scored)
        return m


def _answer(ctx: RunContext, image: Any, prompt: str, max_new_tokens: int) -> str:
    from .generate import greedy_answer

    return greedy_answer(ctx.model, ctx.processor, image, prompt, max_new_tokens, ctx.device, ctx.dtype)
