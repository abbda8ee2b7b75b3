"""Text generation for lorakit's commands and server: one decode loop over a batch whose rows may
use different adapters, with per-row sampling settings, stop strings and token streaming.

The base runs once per step for the whole batch; each adapter runs on its own rows
(``LoraModel.mixed_batch``). Rows are left-padded; a row that has finished keeps its place
(fed padding) until the batch ends.
"""

from __future__ import annotations

import threading
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any, Callable, Sequence

import torch
from torch import nn

__all__ = ["Sampling", "Request", "Output", "generate_batch", "TextStream"]


@dataclass
class Sampling:
    """How one row picks its tokens. temperature 0 is greedy."""

    max_new_tokens: int = 256
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    stop: list[str] = field(default_factory=list)


@dataclass
class Request:
    prompt_ids: list[int]
    adapter: str | None = None  # None: the base model
    sampling: Sampling = field(default_factory=Sampling)
    on_text: Callable[[str], None] | None = None  # streamed text pieces, in order
    cancel: threading.Event | None = None  # set when nobody waits for the answer any more (client gone)


@dataclass
class Output:
    text: str
    token_ids: list[int]
    finish_reason: str  # "stop" (EOS or a stop string) | "length" | "cancelled" (its client went away)
    prompt_tokens: int

    @property
    def completion_tokens(self) -> int:
        return len(self.token_ids)


class TextStream:
    """Incremental detokenisation: emits only text that can no longer change (no half UTF-8
    characters), and holds back anything that could be the start of a stop string."""

    def __init__(self, tokenizer: Any, stop: Sequence[str]) -> None:
        self.tok, self.stop = tokenizer, [s for s in stop if s]
        self.ids: list[int] = []
        self.sent = 0  # characters already emitted
        self.text = ""
        self.stopped = False

    def push(self, token_id: int) -> str:
        self.ids.append(token_id)
        text = self.tok.decode(self.ids, skip_special_tokens=True)
        if text.endswith("\ufffd"):  # a multi-byte character is not complete yet
            return ""
        for s in self.stop:
            at = text.find(s)
            if at != -1:
                text, self.stopped = text[:at], True
        self.text = text
        safe = len(text)
        if not self.stopped:
            for s in self.stop:  # keep back a tail that may grow into a stop string
                for k in range(min(len(s) - 1, len(text)), 0, -1):
                    if text.endswith(s[:k]):
                        safe = min(safe, len(text) - k)
                        break
        piece = text[self.sent:safe]
        self.sent = max(self.sent, safe)
        return piece

    def flush(self) -> str:
        piece = self.text[self.sent:]
        self.sent = len(self.text)
        return piece


def _pick(logits: torch.Tensor, s: Sampling, gen: torch.Generator | None) -> int:
    """Next token for one row from its last-position logits (V,)."""
    if s.temperature <= 0:
        return int(torch.argmax(logits))
    probs = torch.softmax(logits.float() / s.temperature, dim=-1)
    if s.top_p < 1.0:
        sorted_p, order = torch.sort(probs, descending=True)
        keep = torch.cumsum(sorted_p, 0) - sorted_p < s.top_p  # the smallest set reaching top_p
        sorted_p = torch.where(keep, sorted_p, torch.zeros_like(sorted_p))
        probs = torch.zeros_like(probs).scatter_(0, order, sorted_p)
    return int(torch.multinomial(probs, 1, generator=gen))


def _cache_keyword(model: nn.Module) -> str:
    """The forward's name for the KV cache: ``cache`` from transformers 5.24 on (where
    ``past_key_values`` still works but warns), ``past_key_values`` before."""
    import inspect

    forward = type(model).forward
    try:
        params = inspect.signature(forward).parameters  # follows the deprecation wrapper to the real signature
    except (TypeError, ValueError):
        return "past_key_values"
    return "cache" if "cache" in params else "past_key_values"


@torch.no_grad()
def generate_batch(model: nn.Module, tokenizer: Any, requests: list[Request], lora_model: Any = None,
                   eos_ids: Sequence[int] | None = None) -> list[Output]:
    """Run ``requests`` together. ``lora_model`` (a LoraModel) routes each row to its adapter;
    without it every row runs the bare ``model``."""
    from transformers import DynamicCache

    device = next(model.parameters()).device
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else 0
    eos = set(eos_ids if eos_ids is not None else ([tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []))
    gen_cfg_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    if eos_ids is None and gen_cfg_eos is not None:
        eos |= set(gen_cfg_eos if isinstance(gen_cfg_eos, list) else [gen_cfg_eos])
    B = len(requests)
    T = max(len(r.prompt_ids) for r in requests)
    ids = torch.full((B, T), pad, dtype=torch.long)
    mask = torch.zeros((B, T), dtype=torch.long)
    for b, r in enumerate(requests):
        ids[b, T - len(r.prompt_ids):] = torch.tensor(r.prompt_ids)
        mask[b, T - len(r.prompt_ids):] = 1
    ids, mask = ids.to(device), mask.to(device)
    positions = (mask.cumsum(1) - 1).clamp(min=0)
    gens = [torch.Generator().manual_seed(r.sampling.seed) if r.sampling.seed is not None else None for r in requests]
    streams = [TextStream(tokenizer, r.sampling.stop) for r in requests]
    out_ids: list[list[int]] = [[] for _ in requests]
    reasons: list[str | None] = [None] * B
    limit = max(r.sampling.max_new_tokens for r in requests)
    routing = lora_model.mixed_batch([r.adapter for r in requests]) if lora_model is not None else nullcontext()
    cache = {_cache_keyword(model): DynamicCache()}
    with routing:
        step_ids, step_pos = ids, positions
        for _ in range(limit):
            for b, r in enumerate(requests):  # a row whose client is gone stops here, before the next forward
                if reasons[b] is None and r.cancel is not None and r.cancel.is_set():
                    reasons[b] = "cancelled"
            if all(x is not None for x in reasons):
                break
            # The last position as an index, not logits_to_keep=1: the head then reads a contiguous
            # (B, 1, d) copy. From a strided slice, torch's matmul broadcasts a frozen head's weight
            # to (B, d, V) and copies it — B times the head (864 MiB for 16 SmolLM2 prompts).
            last = torch.tensor([step_ids.shape[1] - 1], device=device)
            logits = model(input_ids=step_ids, attention_mask=mask, position_ids=step_pos, **cache,
                           use_cache=True, logits_to_keep=last).logits[:, -1, :].float().cpu()  # (B, V)
            nxt = torch.full((B,), pad, dtype=torch.long)
            for b, r in enumerate(requests):
                if reasons[b] is not None:
                    continue
                tok = _pick(logits[b], r.sampling, gens[b])
                if tok in eos:
                    reasons[b] = "stop"
                    continue
                out_ids[b].append(tok)
                nxt[b] = tok
                piece = streams[b].push(tok)
                if piece and r.on_text is not None:
                    r.on_text(piece)
                if streams[b].stopped:
                    reasons[b] = "stop"
                elif len(out_ids[b]) >= r.sampling.max_new_tokens:
                    reasons[b] = "length"
            if all(x is not None for x in reasons):
                break
            step_ids = nxt[:, None].to(device)
            mask = torch.cat([mask, torch.ones((B, 1), dtype=mask.dtype, device=device)], 1)
            step_pos = step_pos[:, -1:] + 1
    outputs = []
    for b, r in enumerate(requests):
        rest = streams[b].flush()
        if rest and r.on_text is not None:
            r.on_text(rest)
        text = streams[b].text if streams[b].ids else ""
        outputs.append(Output(text, out_ids[b], reasons[b] or "length", len(r.prompt_ids)))
    return outputs

