"""Evaluation: loss on held-out examples, and generation scored against references."""

from __future__ import annotations

import contextlib
import math
from typing import Any, Callable

import torch
from torch import nn

from ..ops.attention import packed_positions, use_packed_attention
from ..data.packing import make_batches
from ..data.templates import Encoded, generation_prompt
from ..inference.generation import Request, Sampling, generate_batch
from ..ops.loss import causal_lm_loss_sum
from .objective import Objective, starting_model

__all__ = ["eval_loss", "preference_scores", "generate_answers", "exact_match", "perplexity", "held_out_scores",
           "answer_tokens", "evaluate_adapter"]


@torch.no_grad()
def eval_loss(model: nn.Module, examples: list[Encoded], max_len: int, batch_size: int, pad_id: int,
              device: torch.device) -> float:
    """Mean next-token CE over the label positions of ``examples`` (packed, per-document attention)."""
    if not examples:
        return float("nan")
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    with use_packed_attention(model):
        for batch in make_batches(examples, max_len, batch_size, True, pad_id, seed=0):
            batch = batch.to(device)
            with packed_positions(batch.position_ids):
                s, n = causal_lm_loss_sum(model, batch.input_ids, batch.labels, batch.position_ids)
            total, count = total + float(s), count + n
    model.train(was_training)
    return total / max(count, 1)


@torch.no_grad()
def preference_scores(lm: Any, objective: Objective, pairs: list[Encoded], max_len: int, batch_size: int, pad_id: int,
                      device: torch.device) -> dict[str, float]:
    """The objective's mean loss over held-out pairs (eval_loss), its rewards as logged in training
    (eval_reward_acc: % of pairs whose chosen reward is higher; eval_reward_margin), and
    eval_pref_acc: % of pairs whose chosen answer has the higher mean log-prob per token — a
    measure that means the same for the base and for any objective."""
    if not pairs:
        return {"eval_loss": float("nan")}
    model = lm.model
    was_training = model.training
    model.eval()
    n = loss = nll = chosen_tokens = prefers = 0.0
    stats: dict[str, float] = {}
    with use_packed_attention(model):
        for batch in make_batches(pairs, max_len, batch_size, True, pad_id, seed=0, pairs=True):
            batch = batch.to(device)
            with packed_positions(batch.position_ids):
                scores = objective.score_pairs(lm, batch)
            n += scores.losses.numel()
            loss += float(scores.losses.sum())
            prefers += float((scores.chosen_mean > scores.rejected_mean).sum())
            if scores.nll_sum is not None:
                nll += float(scores.nll_sum)
                chosen_tokens += float(((batch.labels[:, 1:] != -100) & (batch.doc_ids[:, 1:] % 2 == 0)).sum())
            for k, v in scores.stats().items():
                stats[k] = stats.get(k, 0.0) + v
    model.train(was_training)
    out = {"eval_loss": loss / n + (nll / chosen_tokens if chosen_tokens else 0.0), "eval_pref_acc": 100.0 * prefers / n}
    out.update({f"eval_{k}": v / n * (100.0 if k == "reward_acc" else 1.0) for k, v in stats.items()
                if k in ("reward_acc", "reward_margin", "logp_chosen", "logp_rejected")})
    return out


def generate_answers(model: nn.Module, tokenizer: Any, chats: list[list[dict]], template: str,
                     max_new_tokens: int = 64, batch_size: int = 16) -> list[str]:
    """Greedy answers to each conversation's last user turn (lorakit's decode loop, in batches)."""
    was_training = model.training
    model.eval()
    try:
        answers: list[str] = []
        for i in range(0, len(chats), batch_size):
            requests = [Request(tokenizer(generation_prompt(c, template, tokenizer), add_special_tokens=False)["input_ids"],
                                None, Sampling(max_new_tokens=max_new_tokens)) for c in chats[i:i + batch_size]]
            answers += [out.text for out in generate_batch(model, tokenizer, requests)]
    finally:
        model.train(was_training)
    return answers


def exact_match(answers: list[str], references: list[str], scorer: Callable[[str, str], bool]) -> float:
    """Share of answers the scorer accepts, in percent."""
    if not references:
        return float("nan")
    return 100.0 * sum(scorer(a, r) for a, r in zip(answers, references)) / len(references)


def perplexity(loss: float) -> float:
    return math.exp(loss) if loss == loss and loss < 50 else float("inf")


def held_out_scores(lm: Any, tokenizer: Any, prepared: Any, max_len: int, batch_size: int, device: torch.device,
                    objective: Objective | None = None) -> dict[str, float]:
    """Eval loss and perplexity of ``lm`` as it is set (for preference pairs, the objective's
    ``preference_scores``, by default DPO's); none without held-out examples."""
    if not prepared.val:
        return {}
    if prepared.pairs:
        return preference_scores(lm, objective or Objective("dpo"), prepared.val, max_len, batch_size,
                                 tokenizer.pad_token_id, device)
    loss = eval_loss(lm.model, prepared.val, max_len, batch_size, tokenizer.pad_token_id, device)
    return {"eval_loss": loss, "eval_ppl": perplexity(loss)}


def answer_tokens(tokenizer: Any, references: list[str]) -> int:
    """Tokens to generate to reproduce the longest reference, with room for a little more."""
    return max(len(tokenizer(r, add_special_tokens=False)["input_ids"]) for r in references) + 8


def evaluate_adapter(lm: Any, tokenizer: Any, prepared: Any, max_len: int, batch_size: int, eval_samples: int,
                     device: torch.device, base: bool, objective: Objective | None = None) -> tuple[dict[str, float], list[str]]:
    """A LoraModel's held-out scores (``held_out_scores``) and (when the data has a scorer) exact
    match of greedy answers on the first ``eval_samples`` prompts — for pairs, with the chosen
    answer: the preferred-answer rate; ``base``: the model the run started from (``starting_model``). Returns the scores and the answers."""
    with starting_model(lm) if base else contextlib.nullcontext():
        out = held_out_scores(lm, tokenizer, prepared, max_len, batch_size, device, objective)
        answers: list[str] = []
        if prepared.scorer is not None and prepared.val_chats and eval_samples > 0:
            chats = prepared.val_chats[:eval_samples]
            refs = [r for _, r in chats]
            answers = generate_answers(lm.model, tokenizer, [c for c, _ in chats], prepared.template,
                                       max_new_tokens=answer_tokens(tokenizer, refs))
            out["exact_match"] = exact_match(answers, refs, prepared.scorer)
    return out, answers
