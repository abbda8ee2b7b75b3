"""``--to ollama``: a folder Ollama builds a model from (``ollama create NAME -f Modelfile``).

It holds the GGUF(s) and a ``Modelfile``: ``FROM`` the base GGUF with ``ADAPTER`` the LoRA GGUF
(kept separate, the default) or ``FROM`` the merged GGUF; ``TEMPLATE`` is the chat template the
run trained with, written as Ollama's Go template for the families whose layout is known (ChatML,
SmolLM's and Qwen's included; Llama 3; lorakit's human-assistant); ``SYSTEM`` carries a system
prompt the template adds by default (SmolLM2's does); ``PARAMETER stop`` the end-of-turn tokens.
For other templates no TEMPLATE is written and Ollama reads the GGUF's own chat template.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

__all__ = ["Modelfile", "modelfile_for"]

_CHATML = ("{{- if .System }}<|im_start|>system\n{{ .System }}<|im_end|>\n{{ end }}"
           "{{- range .Messages }}<|im_start|>{{ .Role }}\n{{ .Content }}<|im_end|>\n{{ end }}"
           "<|im_start|>assistant\n")
_LLAMA3 = ("{{- if .System }}<|start_header_id|>system<|end_header_id|>\n\n{{ .System }}<|eot_id|>{{ end }}"
           "{{- range .Messages }}<|start_header_id|>{{ .Role }}<|end_header_id|>\n\n{{ .Content }}<|eot_id|>{{ end }}"
           "<|start_header_id|>assistant<|end_header_id|>\n\n")
_HUMAN_ASSISTANT = ("{{- if .System }}{{ .System }}\n\n{{ end }}"
                    "{{- range .Messages }}{{ if eq .Role \"user\" }}Human: {{ .Content }}\nAssistant: "
                    "{{ else if eq .Role \"assistant\" }}{{ .Content }}{{ $.Eos }}\n{{ end }}{{ end }}")


@dataclass
class Modelfile:
    base: str
    adapter: str | None
    template: str | None
    system: str | None
    stops: list[str]

    def text(self) -> str:
        lines = [f"FROM ./{self.base}"]
        if self.adapter:
            lines.append(f"ADAPTER ./{self.adapter}")
        if self.template is not None:
            lines.append(f'TEMPLATE """{self.template}"""')
        if self.system:
            lines.append(f'SYSTEM """{self.system}"""')
        lines += [f'PARAMETER stop "{s}"' for s in self.stops]
        lines.append("PARAMETER temperature 0")
        return "\n".join(lines) + "\n"


def _family(template: str, tokenizer: Any) -> str | None:
    if template == "chatml":
        return "chatml"
    if template == "human-assistant":
        return "human-assistant"
    jinja = getattr(tokenizer, "chat_template", None) or ""
    if "<|im_start|>" in jinja and "<|im_end|>" in jinja:
        return "chatml"
    if "<|start_header_id|>" in jinja and "<|eot_id|>" in jinja:
        return "llama3"
    return None


def _default_system(tokenizer: Any, family: str) -> str | None:
    """The system prompt the tokenizer's template inserts when a chat has none (SmolLM2's does)."""
    text = tokenizer.apply_chat_template([{"role": "user", "content": "x"}], tokenize=False)
    pattern = {"chatml": r"<\|im_start\|>system\n(.*?)<\|im_end\|>",
               "llama3": r"<\|start_header_id\|>system<\|end_header_id\|>\n\n(.*?)<\|eot_id\|>"}[family]
    m = re.search(pattern, text, flags=re.S)
    return m.group(1) if m else None


def modelfile_for(base: str, adapter: str | None, template: str, tokenizer: Any) -> tuple[Modelfile, str | None]:
    """A Modelfile for the run's chat ``template`` (a lorakit template name); with a note when
    the template has no Ollama translation."""
    family = _family(template, tokenizer)
    eos = tokenizer.eos_token or ""
    if family is None:
        return Modelfile(base, adapter, None, None, [eos] if eos else []), (
            "the chat template is not one lorakit translates to Ollama's Go template; Ollama will read the "
            "GGUF's tokenizer.chat_template (check `ollama show --template`)")
    go = {"chatml": _CHATML, "llama3": _LLAMA3, "human-assistant": _HUMAN_ASSISTANT}[family]
    stops = {"chatml": ["<|im_end|>"], "llama3": ["<|eot_id|>"], "human-assistant": ["\nHuman:"]}[family]
    if family == "human-assistant":
        go = go.replace("{{ $.Eos }}", eos)
        stops = [*stops, *([eos] if eos else [])]
    system = _default_system(tokenizer, family) if template == "tokenizer" and family != "human-assistant" else None
    return Modelfile(base, adapter, go, system, stops), None
