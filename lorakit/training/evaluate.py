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

__all__ = ["eval_loss", "generate_answers", "exact_match", "perplexity", "evaluate_adapter"]


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


def evaluate_adapter(lm: Any, tokenizer: Any, prepared: Any, max_len: int, batch_size: int, eval_samples: int,
                     device: torch.device, base: bool) -> tuple[dict[str, float], list[str]]:
    """A LoraModel's held-out scores: eval loss and perplexity, and (when the data has a scorer)
    exact match of greedy answers on the first ``eval_samples`` prompts; ``base`` disables the
    adapter. Returns the scores and the answers."""
    with lm.disable_adapter() if base else contextlib.nullcontext():
        loss = eval_loss(lm.model, prepared.val, max_len, batch_size, tokenizer.pad_token_id, device)
        out = {"eval_loss": loss, "eval_ppl": perplexity(loss)}
        answers: list[str] = []
        if prepared.scorer is not None and prepared.val_chats and eval_samples > 0:
            chats = prepared.val_chats[:eval_samples]
            refs = [r for _, r in chats]
            longest = max(len(tokenizer(r, add_special_tokens=False)["input_ids"]) for r in refs)
            answers = generate_answers(lm.model, tokenizer, [c for c, _ in chats], prepared.template,
                                       max_new_tokens=longest + 8)
            out["exact_match"] = exact_match(answers, refs, prepared.scorer)
    return out, answers
