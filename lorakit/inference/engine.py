"""A base model with named adapters, ready to answer: what generate, chat and serve share."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable

from torch import nn

from ..data.templates import generation_prompt, resolve_template
from ..errors import LorakitError
from .generation import Output, Request, Sampling, generate_batch
from ..core.lora_model import LoraModel
from ..base import load_model

__all__ = ["Engine", "parse_adapter_spec", "load_engine"]


def parse_adapter_spec(spec: str) -> tuple[str, str]:
    """'name=PATH' -> (name, PATH); a bare PATH is named after its folder."""
    if "=" in spec:
        name, path = spec.split("=", 1)
    else:
        path = spec
        name = Path(spec.rstrip("/")).name or "adapter"
    if not name or not path:
        raise LorakitError(f"--adapter {spec!r}: expected NAME=PATH or PATH")
    return name, path


@dataclass
class Engine:
    """model + tokenizer + template, and the LoraModel that holds the named adapters (if any)."""

    model: nn.Module
    tokenizer: Any
    template: str
    lora: LoraModel | None = None
    base_name: str = "base"
    adapter_paths: dict[str, str] = field(default_factory=dict)
    merged: str | None = None  # the adapter merged into the weights (to_int8 with one adapter)

    @property
    def adapters(self) -> list[str]:
        if self.merged is not None:
            return [self.merged]
        return list(self.lora.configs) if self.lora is not None else []

    def add_adapter(self, name: str, path: str) -> None:
        """Load a PEFT-format adapter under ``name`` (validated against the base first)."""
        if name == self.base_name:
            raise LorakitError(f"adapter name {name!r} is the base model's name; choose another")
        if self.merged is not None:
            raise LorakitError(f"adapter {self.merged!r} is merged into these int8 weights (--int8 with one adapter); "
                               "start with --int8 and every adapter you need (they then run beside the int8 base), "
                               "or without --int8")
        if self.lora is None:
            self.lora = LoraModel(self.model)
        self.lora.load_adapter(path, name, activate=False)
        self.lora.eval()
        self.adapter_paths[name] = str(path)

    def remove_adapter(self, name: str) -> None:
        if self.lora is None or name not in self.lora.configs:
            raise LorakitError(f"no adapter named {name!r}")
        self.lora.delete_adapter(name)
        self.adapter_paths.pop(name, None)

    def check_adapter(self, adapter: str | None) -> None:
        if adapter is not None and adapter not in self.adapters:
            raise LorakitError(f"unknown adapter {adapter!r}; loaded: {', '.join(self.adapters) or 'none'}")
        if adapter is None and self.merged is not None:
            raise LorakitError(f"the base model is not available: adapter {self.merged!r} is merged into its int8 "
                               f"weights (--int8 with one adapter); ask for {self.merged!r}, or start without --int8")

    def to_int8(self, head: bool = True) -> int:
        """Int8 weights and dynamic int8 activations for every linear layer (CPU only). With one
        adapter, it is merged first, so it costs nothing per token; with several, each stays float
        beside the int8 base and requests still pick theirs. Returns the number of int8 layers."""
        from ..core.frozen import to_float_layers
        from ..quant.int8 import quantize_int8

        device = next(self.model.parameters()).device
        if device.type != "cpu":
            raise LorakitError(f"--int8 runs on the CPU (the model is on {device}); on a GPU use --dtype bfloat16 "
                               "or --quantize nf4|int8")
        to_float_layers(self.model)  # a 4-bit base: the float weights the adapter was trained over
        self.model.float()
        if len(self.adapters) == 1:
            name = self.adapters[0]
            self.model = self.lora.merge_and_unload([name])
            self.lora, self.merged = None, name
        return quantize_int8(self.model, head)

    def prompt_ids(self, messages: list[dict]) -> list[int]:
        text = generation_prompt(messages, self.template, self.tokenizer)
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]

    def run(self, requests: list[Request]) -> list[Output]:
        for r in requests:
            self.check_adapter(r.adapter)  # a merged adapter's rows then run the plain model (no LoraModel)
        return generate_batch(self.model, self.tokenizer, requests, self.lora)

    def chat(self, messages: list[dict], adapter: str | None = None, sampling: Sampling | None = None,
             on_text: Callable[[str], None] | None = None) -> Output:
        return self.run([Request(self.prompt_ids(messages), adapter, sampling or Sampling(), on_text)])[0]


def load_engine(model: str, adapters: list[str] | None = None, device: str = "auto", dtype: str = "auto",
                template: str = "auto", trust_remote_code: bool = False, quantize: str = "none",
                double_quant: bool = True, compute_dtype: str = "auto", quantized_base=None,
                int8: bool = False) -> Engine:
    """Load the base (quantized with ``quantize`` nf4 | fp4 | int8, or from the ``quantized_base``
    file a GPTQ-rounded run saved) and each ``NAME=PATH`` adapter (every adapter is checked before
    any is used); ``int8`` then runs it all in int8 on the CPU (``Engine.to_int8``)."""
    specs = [parse_adapter_spec(a) for a in adapters or []]
    names = [n for n, _ in specs]
    if len(set(names)) != len(names):
        raise LorakitError(f"two adapters share a name: {names}; use NAME=PATH to name them")
    base, tok = load_model(model, device, dtype, trust_remote_code, quantize=quantize, double_quant=double_quant,
                           compute_dtype=compute_dtype, quantized_base=quantized_base)
    base.eval()
    engine = Engine(base, tok, resolve_template(template, tok), base_name=Path(model).name if Path(model).exists() else model)
    for name, path in specs:
        engine.add_adapter(name, path)
    if int8:
        engine.to_int8()
    return engine
