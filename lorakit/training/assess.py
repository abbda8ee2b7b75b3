"""``lorakit eval``: the base and one or more adapters scored on one held-out set, with the code a
run evaluates with (``evaluate``): loss and perplexity on the answers; greedy answers to the
prompts whose reference is short, matched exactly and by containment; and a forgetting check —
perplexity on general text (a file, or the base's own answers to everyday prompts) with the
adapter against without it."""

from __future__ import annotations

import contextlib
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable

import torch

from ..data.formats import load_examples
from ..data.general import GENERAL_PROMPTS, TEXT_SUFFIXES, general_text_examples
from ..data.templates import Encoded, encode_example
from ..errors import LorakitError
from .evaluate import answer_tokens, eval_loss, generate_answers, held_out_scores, perplexity
from .objective import Objective

__all__ = ["SHORT_ANSWER_TOKENS", "GENERAL_ANSWER_TOKENS", "ModelEval", "EvalReport", "normalise", "match_scores",
           "short_answer_chats", "general_set", "evaluate_models"]

# References up to this many tokens are "short answers": scored by generation (exact / contains).
SHORT_ANSWER_TOKENS = 48
# Length of the base's answers that make the built-in general text.
GENERAL_ANSWER_TOKENS = 64


@dataclass
class ModelEval:
    """One model's scores: ``name`` is "base" or an adapter's name."""

    name: str
    scores: dict[str, float]
    answers: list[str] = field(default_factory=list)


@dataclass
class EvalReport:
    data: str  # what the held-out set is
    general: str  # what the general text is
    prompts: list[str]  # the last user turn of each generated-for prompt
    references: list[str]
    models: list[ModelEval]

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


def normalise(text: str) -> str:
    """Case-folded, whitespace collapsed, surrounding punctuation and quotes stripped."""
    return " ".join(text.casefold().split()).strip(" .,;:!?\"'`")


def match_scores(answers: list[str], references: list[str],
                 scorer: Callable[[str, str], bool] | None = None) -> dict[str, float]:
    """exact_match: % of answers equal to their reference (the data's scorer where it has one,
    else equal after trimming whitespace); contains: % whose normalised text contains the
    normalised reference."""
    if not references:
        return {}
    exact = scorer or (lambda a, r: a.strip() == r.strip())
    n = len(references)
    return {"exact_match": 100.0 * sum(exact(a, r) for a, r in zip(answers, references)) / n,
            "contains": 100.0 * sum(normalise(r) in normalise(a) for a, r in zip(answers, references)) / n}


def short_answer_chats(tokenizer: Any, chats: list[tuple[list[dict], str]], limit: int) -> list[tuple[list[dict], str]]:
    """The first ``limit`` held-out conversations whose reference answer is short."""
    out = []
    for chat, ref in chats:
        if len(out) >= limit:
            break
        if len(tokenizer(ref, add_special_tokens=False)["input_ids"]) <= SHORT_ANSWER_TOKENS:
            out.append((chat, ref))
    return out


def _encode(examples: list[tuple[str, dict]], template: str, tokenizer: Any, max_len: int) -> list[Encoded]:
    out = []
    for where, ex in examples:
        enc = encode_example(ex, template, tokenizer, False, where)
        enc = Encoded(enc.input_ids[:max_len], enc.labels[:max_len])
        if any(x != -100 for x in enc.labels[1:]):
            out.append(enc)
    return out


def general_set(lm: Any, tokenizer: Any, template: str, max_len: int, path: str | None = None,
                batch_size: int = 16) -> tuple[list[Encoded], str]:
    """The general text the forgetting check scores, and what it is: ``path`` (plain text scored on
    every token, or a data file of the formats ``train`` reads, scored on its answers), else the
    base model's greedy answers to ``GENERAL_PROMPTS`` (the adapter is switched off to write them)."""
    if path is not None:
        p = Path(path)
        examples = general_text_examples(p) if p.suffix in TEXT_SUFFIXES else load_examples([p])
        encoded = _encode(examples, template, tokenizer, max_len)
        if not encoded:
            raise LorakitError(f"{path}: no token to score within {max_len} tokens")
        return encoded, f"{path} ({len(encoded)} texts)"
    chats = [[{"role": "user", "content": q}] for q in GENERAL_PROMPTS]
    with lm.disable_adapter():
        answers = generate_answers(lm.model, tokenizer, chats, template, GENERAL_ANSWER_TOKENS, batch_size)
    examples = [(f"general prompt {i}", {"messages": c + [{"role": "assistant", "content": a}]})
                for i, (c, a) in enumerate(zip(chats, answers)) if a.strip()]
    return _encode(examples, template, tokenizer, max_len), \
        f"the base's own answers to {len(examples)} everyday prompts (built in; --general FILE for your text)"


def _model_scores(lm: Any, tokenizer: Any, prepared: Any, chats: list[tuple[list[dict], str]], general: list[Encoded],
                  max_len: int, batch_size: int, device: torch.device, objective: Objective | None) -> ModelEval:
    """The scores of ``lm`` as it is set (one adapter active, or none)."""
    scores = held_out_scores(lm, tokenizer, prepared, max_len, batch_size, device, objective) if prepared.val else {}
    answers: list[str] = []
    if chats:
        refs = [r for _, r in chats]
        answers = generate_answers(lm.model, tokenizer, [c for c, _ in chats], prepared.template,
                                   max_new_tokens=answer_tokens(tokenizer, refs), batch_size=batch_size)
        scores.update(match_scores(answers, refs, prepared.scorer))
    if general:
        loss = eval_loss(lm.model, general, max_len, batch_size, tokenizer.pad_token_id, device)
        scores.update(general_loss=loss, general_ppl=perplexity(loss))
    return ModelEval("", scores, answers)


def evaluate_models(lm: Any, tokenizer: Any, prepared: Any, adapters: list[str], max_len: int, batch_size: int,
                    samples: int, device: torch.device, general: tuple[list[Encoded], str] | None,
                    objective: Objective | None = None, data: str = "") -> EvalReport:
    """The base (adapters off) and each adapter of ``lm`` in turn, on ``prepared.val`` (and its
    held-out conversations), and on the ``general`` text; the adapters' general perplexity is also
    given against the base's (``forgetting``: +0.10 = 10% higher)."""
    chats = short_answer_chats(tokenizer, prepared.val_chats, samples) if samples > 0 else []
    texts, general_what = general if general is not None else ([], "none")
    models = []
    for name in [None, *adapters]:
        with lm.disable_adapter() if name is None else contextlib.nullcontext():
            if name is not None:
                lm.set_adapter(name)
            result = _model_scores(lm, tokenizer, prepared, chats, texts, max_len, batch_size, device, objective)
        result.name = name or "base"
        models.append(result)
    base_ppl = models[0].scores.get("general_ppl")
    for m in models[1:]:
        if base_ppl and "general_ppl" in m.scores:
            m.scores["forgetting"] = m.scores["general_ppl"] / base_ppl - 1.0
    prompts = [next((t["content"] for t in reversed(c) if t.get("role") == "user"), "") for c, _ in chats]
    return EvalReport(data, general_what, prompts, [r for _, r in chats], models)
