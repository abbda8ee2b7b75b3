"""``lorakit recommend``: look at the data, propose a training config, and say why.

The rules are the common LoRA practice the seeds teach — rank by data size (8 under 5k examples,
16 up to 50k, 32 beyond, 64 past 200k), α = 2r, dropout 0.05–0.1 (more for small sets), rsLoRA
from r = 32, every linear layer for long or multi-turn answers (attention q/v for short single
answers), ``max_len`` from the 95th percentile of the tokenized lengths, an effective batch of
about 16 within the memory the estimator gives, and a 4-bit base when the float weights do not
fit; full fine-tuning instead of LoRA when the data is large (100k examples or more) and every
weight, with its fp32 master copy and optimizer state, fits — each choice printed with its reason
and written as a YAML that ``lorakit train`` runs.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass, field
from typing import Any

from ..config import WEIGHT_LR, DataConfig, RunConfig, run_config_from_dict
from ..errors import LorakitError
from .estimate import Estimate, ModelShape, estimate_memory
from .fit import resident_note

__all__ = ["DataProfile", "profile_data", "Recommendation", "recommend", "format_recommendation", "default_memory"]

TARGET_BATCH = 16  # effective batch (rows × accumulation) the recommendation aims for
FULL_MIN_EXAMPLES = 100_000  # data from which full fine-tuning is proposed, when it fits
_ATTENTION_QV = ("q_proj", "v_proj", "c_attn", "query_key_value", "qkv_proj")


@dataclass
class DataProfile:
    """What the rules need from a dataset, measured with the model's tokenizer and template."""

    examples: int
    multi_turn: float  # fraction of examples with more than one assistant turn
    length_p50: int
    length_p95: int
    length_max: int
    answer_p50: int  # tokens trained on per example (the answers), median
    label_fraction: float  # trained tokens / all tokens
    measured: int = 0  # examples tokenized for the lengths (all of them, or a random sample); 0 = all


def _percentile(values: list[int], q: float) -> int:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, max(0, math.ceil(q * len(ordered)) - 1))]


def profile_data(data: DataConfig, tokenizer: Any, sample: int = 20_000, seed: int = 0) -> DataProfile:
    """Measure ``data`` in one pass that holds at most ``sample`` examples (data larger than memory
    is fine): every example is counted and its turns read; the token lengths come from every example
    up to ``sample`` of them, else from a seeded uniform sample of ``sample`` (a sample that size puts
    the percentiles within a few percent of the full set's; 0 = tokenize all). Examples outside the
    sample are not encoded, so a malformed one there is left to train."""
    from ..data.formats import data_files, iter_examples
    from ..data.sample import sample_items
    from ..data.templates import encode_example, resolve_template

    if data.path is None:
        raise LorakitError("recommend needs --data FILE (a .json/.jsonl/.csv/.parquet file or a folder of them)")
    if sample < 0:
        raise LorakitError(f"--sample must be ≥ 0 (0 tokenizes every example), got {sample}")
    files = data_files(data.path)
    multi_turn = 0

    def counted():
        nonlocal multi_turn
        for where, ex in iter_examples(files, data.format, data.columns):
            multi_turn += sum(1 for m in ex.get("messages", []) if m.get("role") == "assistant") > 1
            yield where, ex

    n, chosen = sample_items(counted(), sample, seed)
    if not n:
        raise LorakitError(f"no records in {', '.join(map(str, files))}")
    template = resolve_template(data.template, tokenizer)
    lengths, answers = [], []
    for _, (where, ex) in chosen:
        enc = encode_example(ex, template, tokenizer, data.train_on_prompt, where)
        lengths.append(len(enc.input_ids))
        answers.append(enc.n_labels)
    return DataProfile(n, multi_turn / n, _percentile(lengths, 0.5),
                       _percentile(lengths, 0.95), max(lengths), _percentile(answers, 0.5),
                       sum(answers) / max(1, sum(lengths)), len(chosen) if len(chosen) < n else 0)


def default_memory() -> tuple[float, str]:
    """The memory to plan for: the GPU's when one is visible, else this machine's RAM."""
    import torch

    if torch.cuda.is_available():
        return float(torch.cuda.get_device_properties(0).total_memory), f"GPU 0 ({torch.cuda.get_device_name(0)})"
    return float(os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")), "this machine's RAM"


@dataclass
class Recommendation:
    config: dict[str, dict[str, Any]]  # nested sections, ready for run_config_from_dict / YAML
    reasons: list[tuple[str, str, str]] = field(default_factory=list)  # (key, value, why)
    estimate: Estimate | None = None
    rss_ratio: float = 1.0  # the expected resident peak over the estimate it was planned with

    def run_config(self) -> RunConfig:
        return run_config_from_dict(self.config)


def _rank_for(n: int) -> tuple[int, str]:
    if n < 5_000:
        return 8, f"{n:,} examples (< 5k): a small rank is enough and overfits less"
    if n < 50_000:
        return 16, f"{n:,} examples (5k–50k)"
    if n < 200_000:
        return 32, f"{n:,} examples (> 50k): more data supports more capacity"
    return 64, f"{n:,} examples (> 200k)"


class _Reasons(list):
    """(key, value, why) in the order the rules decided them."""

    def __call__(self, key: str, value: Any, text: str) -> Any:
        self.append((key, str(value), text))
        return value


def _adapter_rules(profile: DataProfile, shape: ModelShape, why: _Reasons) -> dict[str, Any]:
    """Rank, α, dropout, rsLoRA and targets, from the data's size and the answers' shape."""
    r = why("lora.r", *_rank_for(profile.examples))
    alpha = why("lora.alpha", 2 * r, "α = 2r: the usual scaling s = α/r = 2")
    dropout = why("lora.dropout", 0.1 if profile.examples < 5_000 else 0.05,
                  "small data overfits: 0.1 under 5k examples" if profile.examples < 5_000 else "0.05 for larger sets")
    rslora = why("lora.use_rslora", r >= 32, "rank ≥ 32: α/√r keeps the update's scale stable" if r >= 32
                 else "rank < 32: plain α/r scaling")
    simple = profile.answer_p50 <= 32 and profile.multi_turn < 0.1
    qv = [n for n in shape.linears if n.rsplit(".", 1)[-1] in _ATTENTION_QV]
    if simple and qv:
        targets = why("lora.target_modules", qv, f"short single-turn answers (median {profile.answer_p50} tokens): "
                      "attention q/v projections suffice for a simple mapping")
    else:
        targets = why("lora.target_modules", "all-linear",
                      f"median answer {profile.answer_p50} tokens, {100 * profile.multi_turn:.0f}% multi-turn: "
                      "complex generation gains from adapting every linear layer")
    return {"r": r, "alpha": alpha, "dropout": dropout, "target_modules": targets, "use_rslora": rslora}


def _length_rules(profile: DataProfile, max_positions: int | None, why: _Reasons) -> tuple[int, bool]:
    """max_len (the 95th percentile, rounded up to 64) and whether packing pays."""
    max_len = max(64, 64 * math.ceil(profile.length_p95 / 64))
    cap_note = ""
    if max_positions and max_len > max_positions:
        max_len, cap_note = max_positions, f", capped at the model's {max_positions} positions"
    seen = " measured" if profile.measured else ""
    longer = f"the longest{seen} is {profile.length_max}" if profile.length_max > max_len else f"none{seen} is longer"
    why("data.max_len", max_len, f"95% of examples are ≤ {profile.length_p95} tokens (rounded up to 64{cap_note}); {longer}")
    packing = why("data.packing", profile.length_p50 * 2 <= max_len,
                  f"median example {profile.length_p50} tokens: packing fills rows with several" if profile.length_p50 * 2 <= max_len
                  else f"median example {profile.length_p50} tokens is over half a row: packing gains little")
    return max_len, packing


def _memory_rules(profile: DataProfile, shape: ModelShape, lora: dict[str, Any], max_len: int, device_memory: float,
                  memory_source: str, dtype: str, why: _Reasons, rss_ratio: float = 1.0) -> tuple[str, bool, int, Estimate]:
    """The first setting that fits (with data of FULL_MIN_EXAMPLES or more: full fine-tuning, +
    checkpointing; then LoRA, + checkpointing, QLoRA, + checkpointing), then the largest
    power-of-two batch: (method, checkpointing, batch, the estimate at that batch). A setting fits
    when its estimate times ``rss_ratio`` (the expected resident peak over the estimate on CPU,
    lorakit.planning.fit.rss_ratio, as ``train`` plans) is within ``device_memory``."""
    targets = lora["target_modules"] if isinstance(lora["target_modules"], list) else "all-linear"

    def estimate(method: str, ckpt: bool, batch: int) -> Estimate:
        return estimate_memory(shape, method, lora["r"], targets, batch, max_len, ckpt, dtype, "adamw",
                               label_fraction=profile.label_fraction, device_memory=device_memory / rss_ratio,
                               dropout=lora["dropout"] > 0)

    gib, where = 2 ** 30, f" ({memory_source})" if memory_source else ""
    large = profile.examples >= FULL_MIN_EXAMPLES
    candidates = [("full", False), ("full", True)] if large else []
    for method, ckpt in (*candidates, ("lora", False), ("lora", True), ("qlora", False), ("qlora", True)):
        est = estimate(method, ckpt, 1)
        if est.fits:
            break
    else:
        raise LorakitError(f"even QLoRA with gradient checkpointing at batch 1 × {max_len} tokens needs "
                           f"{est.total / gib:.2f} GiB{resident_note(est.total, rss_ratio)}, more than {device_memory / gib:.2f} GiB{where}; "
                           "lower data.max_len or use a device with more memory")
    if method == "full":
        why("train.method", "full", f"{profile.examples:,} examples (≥ {FULL_MIN_EXAMPLES:,}) and every weight with its "
            f"fp32 master copy and AdamW state fits {device_memory / gib:.2f} GiB{where}: full fine-tuning has the "
            "data to use its capacity")
    else:
        why("train.method", "lora", (f"full fine-tuning does not fit {device_memory / gib:.2f} GiB{where}" if large else
                                     f"{profile.examples:,} examples (< {FULL_MIN_EXAMPLES:,}): LoRA comes within about "
                                     "a point of full fine-tuning at a fraction of its memory"))
    why("model.quantize", "nf4" if method == "qlora" else "none",
        f"{dtype} weights do not fit {device_memory / gib:.2f} GiB{where}: 4-bit NF4 base" if method == "qlora"
        else f"{dtype} {'weights' if method == 'full' else 'LoRA'} fit {device_memory / gib:.2f} GiB{where}")
    why("train.grad_checkpointing", ckpt, "needed to fit: recompute activations in backward" if ckpt
        else "not needed: activations fit")
    batch = 1
    while batch * 2 <= min(TARGET_BATCH, est.max_batch or 1):
        batch *= 2
    why("train.batch_size", batch, f"largest power of two ≤ {TARGET_BATCH} that fits at {max_len} tokens "
        f"(the estimate allows {est.max_batch})")
    return method, ckpt, batch, estimate(method, ckpt, batch)


def recommend(profile: DataProfile, shape: ModelShape, model_name: str, data: DataConfig,
              device_memory: float, memory_source: str = "", max_positions: int | None = None,
              out_dir: str = "runs/recommended", dtype: str = "fp32", rss_ratio: float = 1.0) -> Recommendation:
    """Apply the rules to a measured dataset and a model shape; see the module docstring.
    ``rss_ratio``: the expected resident peak over the estimate (lorakit.planning.fit.rss_ratio)."""
    why = _Reasons()
    lora = _adapter_rules(profile, shape, why)
    max_len, packing = _length_rules(profile, max_positions, why)
    method, ckpt, batch, final = _memory_rules(profile, shape, lora, max_len, device_memory, memory_source, dtype, why,
                                               rss_ratio)
    accum = why("train.grad_accum", max(1, math.ceil(TARGET_BATCH / batch)),
                f"effective batch {batch} × {max(1, math.ceil(TARGET_BATCH / batch))} ≈ {TARGET_BATCH}")
    epochs = 3 if profile.examples < 1_000 else 2 if profile.examples < 10_000 else 1
    why("train.epochs", epochs, f"{profile.examples:,} examples: fewer passes as the data grows")
    r = lora["r"]
    if method == "full":
        lr = why("train.lr", WEIGHT_LR, "full fine-tuning moves the weights themselves: a few times below LoRA's 2e-4")
        reasons = [x for x in why if not x[0].startswith("lora.")]  # no adapter
    else:
        lr = why("train.lr", 1e-4 if r >= 64 else 2e-4, "2e-4, the common LoRA rate" + ("; 1e-4 at r ≥ 64" if r >= 64 else ""))
        reasons = list(why)
    model = {"name": model_name, **({"quantize": "nf4"} if method == "qlora" else {})}
    data_section: dict[str, Any] = {"path": data.path, "max_len": max_len, "packing": packing}
    for key in ("format", "columns", "template"):
        if getattr(data, key) != getattr(DataConfig(), key):
            data_section[key] = getattr(data, key)
    config = {
        "model": model,
        "data": data_section,
        **({} if method == "full" else {"lora": lora}),
        "train": {**({"method": "full"} if method == "full" else {}), "lr": lr, "batch_size": batch,
                  "grad_accum": accum, "epochs": epochs, "grad_checkpointing": ckpt, "out_dir": out_dir},
    }
    return Recommendation(config, reasons, final, rss_ratio)


def format_recommendation(rec: Recommendation, profile: DataProfile) -> str:
    sampled = f" (lengths from a random {profile.measured:,})" if profile.measured else ""
    lines = [f"data: {profile.examples:,} examples{sampled}; tokens per example p50 {profile.length_p50}, "
             f"p95 {profile.length_p95}, max {profile.length_max}; median answer {profile.answer_p50} tokens; "
             f"{100 * profile.multi_turn:.0f}% multi-turn", ""]
    width = max(len(k) for k, _, _ in rec.reasons)
    for key, value, text in rec.reasons:
        lines.append(f"  {key:<{width}}  {value:<14} {text}")
    if rec.estimate is not None:
        lines.append(f"\nestimated peak memory: {rec.estimate.total / 2**30:.2f} GiB"
                     f"{resident_note(rec.estimate.total, rec.rss_ratio)} (lorakit estimate for the details)")
    return "\n".join(lines)
