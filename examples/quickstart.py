"""lorakit in one minute, on a tiny Llama built from a config (no download).

1. a base model is pre-trained a little on one task (shift every token by +1);
2. a LoRA adapter (r=16, q/k/v/o + MLP) learns a second task (shift by +2) with the base frozen;
3. the adapter is saved in PEFT's format, loaded back, merged for zero-latency inference,
   and the merged model gives the same answers.
Run: python examples/quickstart.py
"""

from __future__ import annotations

import tempfile
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from lorakit import LoraConfig, LoraModel, get_lora_model

VOCAB, SEQ = 64, 16


def batch(shift: int, n: int, g: torch.Generator) -> torch.Tensor:
    """Rows 'x1..x8 | x1+shift..x8+shift' (mod VOCAB): the model must learn the mapping."""
    x = torch.randint(0, VOCAB, (n, SEQ // 2), generator=g)
    return torch.cat([x, (x + shift) % VOCAB], 1)


def train(model: torch.nn.Module, shift: int, steps: int, lr: float, seed: int) -> None:
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    model.train()
    for _ in range(steps):
        ids = batch(shift, 32, g)
        labels = ids.clone()
        labels[:, : SEQ // 2] = -100  # loss on the answer half only
        model(input_ids=ids, labels=labels).loss.backward()
        opt.step()
        opt.zero_grad()
    model.eval()


@torch.no_grad()
def accuracy(model: torch.nn.Module, shift: int) -> float:
    ids = batch(shift, 256, torch.Generator().manual_seed(123))
    pred = model(input_ids=ids).logits[:, SEQ // 2 - 1 : -1].argmax(-1)
    return (pred == ids[:, SEQ // 2 :]).float().mean().item()


def main() -> None:
    torch.manual_seed(0)
    t0 = time.time()
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=128, intermediate_size=256, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=4, max_position_embeddings=SEQ)
    base = LlamaForCausalLM(cfg)
    train(base, shift=1, steps=300, lr=3e-3, seed=1)
    print(f"base model: task A (shift +1) accuracy {accuracy(base, 1):.1%}, task B (shift +2) {accuracy(base, 2):.1%}")

    model = get_lora_model(base, LoraConfig(r=16, alpha=32))
    model.print_trainable_parameters()
    train(model, shift=2, steps=600, lr=5e-3, seed=2)
    b_after = accuracy(model, 2)
    with model.disable_adapter():
        a_base = accuracy(model, 1)
    print(f"with the adapter: task B accuracy {b_after:.1%}; adapter disabled: task A still {a_base:.1%}")

    with tempfile.TemporaryDirectory() as folder:
        model.save_pretrained(folder)
        print(f"saved PEFT-format adapter: {sorted(p.name for p in __import__('pathlib').Path(folder).iterdir())}")
        reloaded = LoraModel.from_pretrained(base_copy(base, model), folder)
        merged = reloaded.merge_and_unload()
    ids = batch(2, 8, torch.Generator().manual_seed(9))
    with torch.no_grad():
        diff = (merged(input_ids=ids).logits - model(input_ids=ids).logits).abs().max().item()
    print(f"merged model (plain {type(merged).__name__}): task B accuracy {accuracy(merged, 2):.1%}, "
          f"max |logit difference| vs adapter = {diff:.2e}")
    print(f"done in {time.time() - t0:.1f}s")


def base_copy(base: torch.nn.Module, model: LoraModel) -> torch.nn.Module:
    """A fresh copy of the frozen base (the adapter disabled), as if loaded from disk again."""
    fresh = LlamaForCausalLM(base.config)
    with model.disable_adapter():
        state = {k.replace(".base_layer", ""): v for k, v in model.model.state_dict().items() if "lora_" not in k}
    fresh.load_state_dict(state)
    return fresh.eval()


if __name__ == "__main__":
    main()
