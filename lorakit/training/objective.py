"""What a run minimises (``train.objective``): the next-token loss on answers (sft), or a
preference loss over (chosen, rejected) pairs (dpo, orpo, simpo; ``lorakit.ops.preference``).

The loop asks an objective two things: the step's totals (what one mean over the optimizer step
divides by — label tokens for sft, pairs for the preference losses, and for ORPO also the chosen
answers' tokens of its NLL term), and each micro-batch's share of the step's loss with the
numbers to log. A pair's two answers sit in one micro-batch (one packed row, or two padded rows:
``lorakit.data.packing``), so one forward scores both; DPO's reference is the same model with
the adapter switched off (or, training ``train.init_adapter`` further, with that adapter's frozen
copy: ``starting_model``), run once more without gradients — no second copy of the model.
"""

from __future__ import annotations

from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, Iterator

import torch
from torch import Tensor, nn

from ..config import TrainConfig
from ..data.packing import Batch
from ..ops.loss import causal_lm_loss_sum, token_logprobs
from ..ops.preference import dpo_losses, orpo_losses, sequence_sums, simpo_losses

__all__ = ["INIT_ADAPTER", "Totals", "Objective", "PairScores", "make_objective", "pair_counts", "starting_model"]

# The frozen copy of train.init_adapter a run keeps beside the adapter it trains: its "before".
INIT_ADAPTER = "init"


@dataclass(frozen=True)
class Totals:
    """An optimizer step's denominators, all ranks together."""

    labels: int  # label positions (sft)
    pairs: int = 0  # preference pairs
    chosen_labels: int = 0  # label positions of the chosen answers (ORPO's NLL term)


def pair_counts(batch: Batch) -> tuple[int, int]:
    """(pairs, label positions of chosen answers) of a pair batch (examples 2j chosen, 2j+1 rejected)."""
    docs = batch.doc_ids
    pairs = int(torch.unique(docs[docs >= 0] // 2).numel())
    chosen = int(((batch.labels[:, 1:] != -100) & (docs[:, 1:] % 2 == 0)).sum())
    return pairs, chosen


@dataclass
class PairScores:
    """Per pair (P,): the loss term, rewards, summed and mean log-probs; ORPO's NLL sum (scalar)."""

    losses: Tensor
    chosen_rewards: Tensor
    rejected_rewards: Tensor
    chosen_logp: Tensor
    rejected_logp: Tensor
    chosen_mean: Tensor
    rejected_mean: Tensor
    nll_sum: Tensor | None = None

    def stats(self) -> dict[str, float]:
        """Sums over the pairs of what is logged (the loop divides by the step's pairs)."""
        out = {"reward_chosen": self.chosen_rewards.sum(), "reward_rejected": self.rejected_rewards.sum(),
               "reward_margin": (self.chosen_rewards - self.rejected_rewards).sum(),
               "reward_acc": (self.chosen_rewards > self.rejected_rewards).float().sum(),
               "logp_chosen": self.chosen_logp.detach().sum(), "logp_rejected": self.rejected_logp.detach().sum()}
        return {k: float(v) for k, v in out.items()}


def _sequence_logps(model: nn.Module, batch: Batch) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """(chosen sums, rejected sums, chosen counts, rejected counts) of log p over each answer, (P,) each."""
    logp = token_logprobs(model, batch.input_ids, batch.labels, batch.position_ids, batch.attention_mask)
    docs = batch.doc_ids[:, 1:][batch.labels[:, 1:] != -100]  # the example each label belongs to
    _, local = torch.unique(docs // 2, return_inverse=True)  # pair index within this batch
    sums, counts = sequence_sums(logp, 2 * local + docs % 2, 2 * (int(local.max()) + 1))
    return sums[0::2], sums[1::2], counts[0::2], counts[1::2]


class Objective:
    """train.objective as the loop uses it (see the module doc)."""

    def __init__(self, name: str, beta: float = 0.1, gamma: float = 0.5) -> None:
        self.name, self.beta, self.gamma = name, beta, gamma

    @property
    def pairs(self) -> bool:
        return self.name != "sft"

    def totals(self, group: list[Batch]) -> Totals:
        labels = sum(b.n_labels for b in group)
        if not self.pairs:
            return Totals(max(1, labels))
        counts = [pair_counts(b) for b in group]
        return Totals(max(1, labels), max(1, sum(p for p, _ in counts)), max(1, sum(c for _, c in counts)))

    def score_pairs(self, lm: Any, batch: Batch) -> PairScores:
        """The policy's (and for DPO the reference's) log-probs of each pair's answers, and the loss terms."""
        model = lm.model
        c_sum, r_sum, c_n, r_n = _sequence_logps(model, batch)
        c_mean, r_mean = c_sum / c_n, r_sum / r_n
        nll = None
        if self.name == "dpo":
            with torch.no_grad(), starting_model(lm):
                ref_c, ref_r, _, _ = _sequence_logps(model, batch)
            losses, c_rew, r_rew = dpo_losses(c_sum, r_sum, ref_c, ref_r, self.beta)
        elif self.name == "orpo":
            losses, c_rew, r_rew = orpo_losses(c_mean, r_mean, self.beta)
            nll = -c_sum.sum()
        else:
            losses, c_rew, r_rew = simpo_losses(c_mean, r_mean, self.beta, self.gamma)
        return PairScores(losses, c_rew, r_rew, c_sum, r_sum, c_mean.detach(), r_mean.detach(), nll)

    def loss(self, lm: Any, batch: Batch, totals: Totals) -> tuple[Tensor, dict[str, float]]:
        """This micro-batch's share of the step's mean loss, and its sums to log."""
        if not self.pairs:
            loss_sum, _ = causal_lm_loss_sum(lm.model, batch.input_ids, batch.labels, batch.position_ids,
                                             batch.attention_mask)
            return loss_sum / totals.labels, {}
        scores = self.score_pairs(lm, batch)
        loss = scores.losses.sum() / totals.pairs
        stats = scores.stats()
        if scores.nll_sum is not None:  # ORPO: the chosen answers' mean NLL over the step, plus the odds-ratio term
            loss = loss + scores.nll_sum / totals.chosen_labels
            stats["nll"] = float(scores.nll_sum.detach()) * totals.pairs / totals.chosen_labels  # (÷ pairs when logged)
        return loss, stats


@contextmanager
def starting_model(lm: Any) -> Iterator[None]:
    """Inside the block ``lm`` is the model its run started from — DPO's reference and the "before"
    of the evaluation: the base with the adapter off, or train.init_adapter's frozen copy — with
    dropout off (a reference is a fixed function, as TRL's default disable_dropout makes it)."""
    modules = list(lm.model.modules())
    was = [m.training for m in modules]
    start = lm.using_adapter(INIT_ADAPTER) if INIT_ADAPTER in getattr(lm, "configs", {}) else lm.disable_adapter()
    lm.model.eval()
    try:
        with start:
            yield
    finally:
        for m, training in zip(modules, was):
            m.training = training


def make_objective(t: TrainConfig) -> Objective:
    return Objective(t.objective, t.preference_beta, t.simpo_gamma)
