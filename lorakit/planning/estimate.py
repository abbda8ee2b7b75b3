"""Memory needed to fine-tune a model, from its config alone (never its weights).

The estimate is a sum of parts, each a formula with its reasoning next to it:
frozen weights, adapter (or full) parameters, their gradients and optimizer state, activations
saved for the backward pass, the loss buffer, and a framework overhead.

Validation: ``bench/estimate_validation.py`` compares it with measured peaks of real training
steps (docs/benchmarks.md).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass, field
from typing import Any

from ..errors import LorakitError

__all__ = ["ModelShape", "shape_from_config", "Estimate", "estimate_memory", "parse_size", "ESTIMATE_METHODS",
           "BITS_NF4_DOUBLE_QUANT", "BITS_NF4"]

# 4-bit NF4: blocks of 64 weights share one absmax. As an fp32 scale that is 32/64 = 0.5 extra
# bits per weight (4.5); double quantization stores the scales in 8 bits, in blocks of 256 with
# one fp32 scale each: 8/64 + 32/(64·256) = 0.127 extra bits (4.127).
BITS_NF4 = 4 + 32 / 64
BITS_NF4_DOUBLE_QUANT = 4 + 8 / 64 + 32 / (64 * 256)
_BYTES = {"fp32": 4, "bf16": 2, "fp16": 2}
_OPTIMIZER_BYTES = {"adamw": 8, "adamw8bit": 2, "sgd": 0}  # state bytes per trainable parameter
# positions per chunk of the label-only loss by bytes per activation: fp32, 16-bit (lorakit.ops.loss.default_chunk)
LOSS_CHUNKS = {4: 512, 2: 128}


@dataclass
class ModelShape:
    """What the arithmetic needs from a decoder-only transformer config."""

    model_type: str
    vocab: int
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    tie_embeddings: bool
    linears: dict[str, tuple[int, int]] = field(default_factory=dict)  # per layer: name -> (in, out)
    silu_gated: bool = False  # gate_proj/up_proj with SiLU: lorakit.ops.gated_mlp keeps 2 wide tensors, not 4
    llama_norms: bool = False  # Llama's RMSNorm: lorakit.ops.rms_norm keeps no fp32 copy in half precision

    @property
    def head_dim(self) -> int:
        return self.hidden // self.heads

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim

    @property
    def layer_linear_params(self) -> int:
        return sum(i * o for i, o in self.linears.values())

    @property
    def total_params(self) -> int:
        emb = self.vocab * self.hidden
        norms = (2 * self.layers + 1) * self.hidden
        return self.layers * self.layer_linear_params + emb * (1 if self.tie_embeddings else 2) + norms


def _get(cfg: Any, *names: str, default=None):
    for n in names:
        v = getattr(cfg, n, None)
        if v is not None:
            return v
    if default is not None:
        return default
    raise LorakitError(f"the model config has none of the fields {names}; cannot estimate this architecture")


def shape_from_config(cfg: Any) -> ModelShape:
    """ModelShape from a transformers config (Llama-like, GPT-2, BLOOM, GPT-NeoX, OPT families)."""
    mt = getattr(cfg, "model_type", "unknown")
    h = _get(cfg, "hidden_size", "n_embd", "d_model")
    layers = _get(cfg, "num_hidden_layers", "n_layer", "num_layers")
    heads = _get(cfg, "num_attention_heads", "n_head")
    kv = getattr(cfg, "num_key_value_heads", None) or heads
    inter = getattr(cfg, "intermediate_size", None) or getattr(cfg, "n_inner", None) or getattr(cfg, "ffn_dim", None) or 4 * h
    vocab = _get(cfg, "vocab_size")
    tie = bool(getattr(cfg, "tie_word_embeddings", True))
    kvd = kv * (h // heads)
    if mt == "gpt2":
        lin = {"c_attn": (h, 3 * h), "attn.c_proj": (h, h), "c_fc": (h, inter), "mlp.c_proj": (inter, h)}
    elif mt in ("bloom", "gpt_neox"):
        lin = {"query_key_value": (h, 3 * h), "dense": (h, h), "dense_h_to_4h": (h, inter), "dense_4h_to_h": (inter, h)}
    elif mt == "opt":
        lin = {"q_proj": (h, h), "k_proj": (h, h), "v_proj": (h, h), "out_proj": (h, h), "fc1": (h, inter), "fc2": (inter, h)}
    elif mt == "phi3":
        lin = {"qkv_proj": (h, h + 2 * kvd), "o_proj": (h, h), "gate_up_proj": (h, 2 * inter), "down_proj": (inter, h)}
    else:  # Llama-like: q/k/v/o + gated MLP
        lin = {"q_proj": (h, h), "k_proj": (h, kvd), "v_proj": (h, kvd), "o_proj": (h, h),
               "gate_proj": (h, inter), "up_proj": (h, inter), "down_proj": (inter, h)}
    silu = "gate_proj" in lin and getattr(cfg, "hidden_act", getattr(cfg, "hidden_activation", "silu")) in ("silu", "swish")
    llama_norms = "gate_proj" in lin and not mt.startswith("gemma")  # Gemma's norm is 1 + weight
    return ModelShape(mt, vocab, h, inter, layers, heads, kv, tie, lin, silu, llama_norms)


def parse_size(text: str) -> float:
    """'24GB', '8GiB', '512MB', '1.5T' -> bytes (GB and GiB both mean 2^30, as GPU memory is quoted)."""
    import re

    m = re.fullmatch(r"\s*([\d.]+)\s*([KMGT]?)(I?B)?\s*", text.upper())
    if not m:
        raise LorakitError(f"cannot read memory size {text!r}; write it like 24GB or 512MB")
    return float(m.group(1)) * 1024 ** " KMGT".index(m.group(2) or " ")


@dataclass
class Estimate:
    """Bytes per component; ``fits``/``max_batch``/``max_seq`` when a device size was given."""

    components: dict[str, float]
    trainable_params: int
    frozen_params: int
    adapter_by_type: dict[str, dict[str, float]]
    settings: dict[str, Any]
    device_memory: float | None = None
    max_batch: int | None = None
    max_seq: int | None = None

    @property
    def total(self) -> float:
        return sum(self.components.values())

    @property
    def fits(self) -> bool | None:
        return None if self.device_memory is None else self.total <= self.device_memory

    def to_dict(self) -> dict:
        d = asdict(self)
        d.update(total=self.total, fits=self.fits)
        return d


def _dropout_bytes_per_layer(s: ModelShape, names: list[str], dora: bool, act_bytes: int) -> int:
    """Per token and layer, what adapter dropout keeps for backward: nothing for LoRA
    (lorakit.core.dropout recomputes its mask from a seed); DoRA drops out with nn.Dropout, which
    keeps a 1-byte mask and the dropped-out copy of each adapted projection's input."""
    if dora:
        return sum(s.linears[n][0] * (1 + act_bytes) for n in names)
    return 0


def _activation_bytes_per_token(s: ModelShape, act_bytes: int, r: int, n_adapted: int, grad_ckpt: bool,
                                dora_outs: int = 0, dropout_bytes: int = 0) -> float:
    """Bytes kept for backward per token, all layers, for a Llama-like block with a frozen base.

    Saved per layer and token (floats): the block input and the residual sum after attention (2h),
    which the norms keep; the two norms' outputs, which the projections after them keep (2h; none
    for Llama-style norms, whose outputs lorakit.ops.rms_norm recomputes in backward, except under
    checkpointing); the rotated q, k and v, and the attention output, which is also o_proj's input
    (2h + 2·kv; one tensor for both in packed rows too, lorakit.ops.attention); the MLP's gate, up,
    SiLU(gate) and the product fed to down_proj (4·I; 2·I for a SiLU-gated MLP, whose SiLU and
    product lorakit.ops.gated_mlp recomputes in backward);
    each adapted projection's A·x (r). A frozen weight's matmul keeps no input, nor does a frozen
    norm weight's multiply. Measured on SmolLM2 (saved-tensor hooks, one packed row of 1,024
    tokens, fp32, dropout 0.05): 831 KB a token against this formula's 823 while the norms'
    outputs were kept. DoRA keeps each
    adapted projection's output before its rescaling too (``dora_outs``: their output widths
    summed) and its dropout masks and copies (``dropout_bytes`` a layer). With checkpointing only
    each block's input is kept (h per layer), plus one block's activations while it is recomputed.

    In half precision transformers' RMSNorms compute in fp32 and keep their fp32 input and
    normalised product for backward: 2 × 2h fp32 values more per layer (measured on SmolLM2 in
    bf16: the estimate was 18.5% low without them) — except Llama-style norms, which
    lorakit.ops.rms_norm runs keeping only their (half-precision) input and rstd.
    """
    mlp = (2 if s.silu_gated else 4) * s.intermediate
    norm_outputs = 0 if s.llama_norms and not grad_ckpt else 2 * s.hidden
    per_layer = 2 * s.hidden + norm_outputs + (2 * s.hidden + 2 * s.kv_dim) + mlp + n_adapted * r + dora_outs
    fp32_norms = 0 if act_bytes >= 4 or s.llama_norms else 2 * 2 * s.hidden * 4
    per_layer_bytes = act_bytes * per_layer + fp32_norms + dropout_bytes
    if grad_ckpt:
        return act_bytes * s.layers * s.hidden + per_layer_bytes
    return s.layers * per_layer_bytes


ESTIMATE_METHODS = ("lora", "qlora", "full", "freeze")


def _weight_method(comp: dict[str, float], s: ModelShape, method: str, freeze_layers: int, wb: int) -> tuple[int, int]:
    """A full/freeze run's weights: (trainable, frozen) parameter counts, their bytes into ``comp``.
    Trained weights are fp32 master copies; under 16-bit autocast each also has a cached 16-bit
    copy while the step runs. Freeze trains |freeze_layers| decoder blocks (linears and 2 norms each)."""
    if method == "full":
        trainable = s.total_params
    else:
        trainable = min(abs(freeze_layers), s.layers) * (s.layer_linear_params + 2 * s.hidden)
    frozen = s.total_params - trainable
    comp["trained weights (fp32 master copies)"] = trainable * 4
    if wb < 4:
        comp["autocast copies of the trained weights"] = trainable * wb
    if frozen:
        comp[f"frozen weights ({'fp32' if wb == 4 else 'bf16'})"] = frozen * wb
    return trainable, frozen


def estimate_memory(s: ModelShape, method: str = "lora", r: int = 16, targets: list[str] | str = "all-linear",
                    batch: int = 4, seq: int = 1024, grad_ckpt: bool = False, dtype: str = "fp32",
                    optimizer: str = "adamw", double_quant: bool = True, label_fraction: float = 1.0,
                    chunked_loss: bool = True, overhead_bytes: float | None = None,
                    device_memory: float | None = None, dora: bool = False, freeze_layers: int = 2,
                    dropout: bool = False) -> Estimate:
    """Memory for one training step of ``batch`` rows of ``seq`` tokens. ``method`` full/freeze:
    the model's own weights train (freeze: ``freeze_layers`` decoder blocks), as lorakit trains
    them (fp32 master weights, lorakit.core.full_tuning)."""
    if method not in ESTIMATE_METHODS:
        raise LorakitError(f"method must be {', '.join(ESTIMATE_METHODS[:-1])} or {ESTIMATE_METHODS[-1]}, got {method!r}")
    if dtype not in _BYTES:
        raise LorakitError(f"dtype must be fp32, bf16 or fp16, got {dtype!r}")
    if optimizer not in _OPTIMIZER_BYTES:
        raise LorakitError(f"optimizer must be one of {', '.join(_OPTIMIZER_BYTES)}, got {optimizer!r}")
    if batch < 1 or seq < 1 or r < 1:
        raise LorakitError(f"batch, seq and r must be at least 1 (got batch={batch}, seq={seq}, r={r})")
    wb = _BYTES[dtype]
    names = list(s.linears) if targets == "all-linear" else [n for n in s.linears if any(n == t or n.endswith(t) for t in targets)]
    if targets != "all-linear" and not names:
        raise LorakitError(f"targets {targets} match none of this model's projections: {', '.join(s.linears)}")
    linear = s.layers * s.layer_linear_params
    other = s.total_params - linear
    comp: dict[str, float] = {}
    adapter_by_type: dict[str, dict[str, float]] = {}
    weights_train = method in ("full", "freeze")
    if weights_train:
        trainable, frozen = _weight_method(comp, s, method, freeze_layers, wb)
    else:
        for n in names:
            i, o = s.linears[n]
            per = r * (i + o) + (o if dora else 0)  # DoRA: one magnitude per output
            adapter_by_type[n] = {"shape": f"{i}x{o}", "params_per_layer": per, "params": per * s.layers,
                                  "saved_pct": 100 * (1 - per / (i * o))}
        trainable = sum(v["params"] for v in adapter_by_type.values())
        frozen = s.total_params
        if method == "qlora":
            bits = BITS_NF4_DOUBLE_QUANT if double_quant else BITS_NF4
            comp[f"frozen linear weights (NF4, {bits:.3f} bits)"] = linear * bits / 8
            comp[f"frozen embeddings/norms ({dtype})"] = other * wb
        else:
            comp[f"frozen weights ({dtype})"] = frozen * wb
        comp["adapter parameters (fp32)"] = trainable * 4
    comp["gradients (fp32)"] = trainable * 4
    comp[f"optimizer state ({optimizer})"] = trainable * _OPTIMIZER_BYTES[optimizer]
    tokens = batch * seq
    act_b = 4 if dtype == "fp32" else 2
    dora_outs = sum(s.linears[n][1] for n in names) if dora and not weights_train else 0
    drop_b = _dropout_bytes_per_layer(s, names, dora, act_b) if dropout and not weights_train else 0
    per_token = _activation_bytes_per_token(s, act_b, 0 if weights_train else r, 0 if weights_train else len(names),
                                            grad_ckpt, dora_outs, drop_b)
    if method == "freeze":  # only the trained blocks keep activations (no gradient reaches the others)
        per_token *= min(abs(freeze_layers), s.layers) / s.layers
    comp["activations"] = tokens * per_token
    labels = max(1, int(tokens * label_fraction))
    chunk_bytes = s.vocab * (4 if act_b == 4 else 6)  # per position of a loss chunk: fp32 logits (+ 16-bit ones)
    if chunked_loss:
        # One chunk of fp32 logits (log-sum-exp and softmax are taken in place, and one chunk is
        # alive at a time), plus the label positions' hidden states and their saved gradient. In
        # half precision the head's matmul first gives the chunk in 16 bits (and the chunk's
        # gradient goes back to 16 bits for the weight's matmul): one 16-bit chunk more at the peak.
        comp["loss (chunked logits)"] = min(labels, LOSS_CHUNKS[act_b]) * chunk_bytes + 2 * labels * s.hidden * act_b
    else:
        # Full logits, their fp32 copy for the loss, and the gradient of the same size.
        comp["loss (full logits)"] = 3 * tokens * s.vocab * 4
    loss_key = next(k for k in comp if k.startswith("loss"))
    comp["framework overhead"] = overhead_bytes if overhead_bytes is not None else 0.0
    est = Estimate(comp, trainable, frozen, adapter_by_type,
                   dict(method=method, r=r, targets=names, batch=batch, seq=seq, grad_ckpt=grad_ckpt, dtype=dtype,
                        optimizer=optimizer, double_quant=double_quant, dora=dora, dropout=dropout,
                        **({"freeze_layers": freeze_layers} if method == "freeze" else {})), device_memory)
    if device_memory is not None:
        fixed = est.total - comp["activations"] - comp[loss_key]
        per_token = comp["activations"] / tokens
        loss_per_token = 2 * s.hidden * act_b + (0 if chunked_loss else 3 * s.vocab * 4)
        room = device_memory - fixed - (LOSS_CHUNKS[act_b] * chunk_bytes if chunked_loss else 0)
        max_tokens = int(room / (per_token + loss_per_token)) if room > 0 else 0
        est.max_batch = max_tokens // seq
        est.max_seq = max_tokens // batch
    return est


def format_estimate(e: Estimate) -> str:
    gib = 2 ** 30
    st = e.settings
    if st["method"] == "full":
        what = "full fine-tuning"
    elif st["method"] == "freeze":
        what = f"freeze ({abs(st['freeze_layers'])} blocks train)"
    else:
        what = f"{st['method']}{' (DoRA)' if st.get('dora') else ''} r={st['r']}"
    lines = [f"{what} batch={st['batch']} seq={st['seq']} dtype={st['dtype']} "
             f"optimizer={st['optimizer']} grad_ckpt={st['grad_ckpt']}",
             f"trainable params: {e.trainable_params:,d}   frozen params: {e.frozen_params:,d}", ""]
    if e.adapter_by_type:
        lines.append(f"  {'adapter target':<16}{'W shape':>12}{'params/layer':>14}{'all layers':>14}{'vs full W':>11}")
        for n, v in e.adapter_by_type.items():
            lines.append(f"  {n:<16}{v['shape']:>12}{v['params_per_layer']:>14,.0f}{v['params']:>14,.0f}"
                         f"{-v['saved_pct']:>10.1f}%")
        lines.append("")
    for k, v in e.components.items():
        lines.append(f"  {k:<44}{v / gib:>9.3f} GiB")
    lines.append(f"  {'total':<44}{e.total / gib:>9.3f} GiB")
    if e.device_memory is not None:
        verdict = "fits" if e.fits else "does NOT fit"
        lines.append(f"\n{verdict} in {e.device_memory / gib:.1f} GiB; largest batch at seq={st['seq']}: {e.max_batch}, "
                     f"largest seq at batch={st['batch']}: {e.max_seq}")
    return "\n".join(lines)

