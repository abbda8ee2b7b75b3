"""Chat templates and label masks.

A template turns a conversation into segments ``(text, trained)``; each segment is tokenized on
its own and the tokens of trained segments become labels. By default only assistant turns and
the end-of-turn token after each are trained (``train_on_prompt`` trains everything).

- ``tokenizer`` (default when the tokenizer has a chat template): the tokenizer's own Jinja
  template; an assistant turn's text is what rendering the conversation up to and including that
  turn adds after the generation prompt.
- ``chatml``: ``<|im_start|>role\\n…<|im_end|>\\n``.
- ``human-assistant``: the seeds' ``Human: …\\nAssistant: …`` followed by the EOS token.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from ..errors import LorakitError

__all__ = ["TEMPLATES", "Encoded", "render_segments", "encode_example", "generation_prompt", "resolve_template"]

TEMPLATES = ("auto", "tokenizer", "chatml", "human-assistant")


@dataclass
class Encoded:
    """One tokenized example: ids and labels of the same length (-100 where no loss)."""

    input_ids: list[int]
    labels: list[int]

    @property
    def n_labels(self) -> int:
        return sum(1 for x in self.labels if x != -100)


def resolve_template(name: str, tokenizer: Any) -> str:
    if name not in TEMPLATES:
        raise LorakitError(f"--template must be one of {', '.join(TEMPLATES)}, got {name!r}")
    if name == "auto":
        return "tokenizer" if getattr(tokenizer, "chat_template", None) else "chatml"
    if name == "tokenizer" and not getattr(tokenizer, "chat_template", None):
        raise LorakitError("this tokenizer has no chat template; pass --template chatml or --template human-assistant")
    return name


def _render_tokenizer(tokenizer, messages: list[dict], where: str) -> list[tuple[str, bool]]:
    segments: list[tuple[str, bool]] = []
    done = ""
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        prompt = tokenizer.apply_chat_template(messages[:i], tokenize=False, add_generation_prompt=True)
        full = tokenizer.apply_chat_template(messages[: i + 1], tokenize=False)
        if not prompt.startswith(done) or not full.startswith(prompt):
            raise LorakitError(f"{where}: the tokenizer's chat template renders earlier turns differently as the "
                               "conversation grows, so assistant tokens cannot be located; set data.template to chatml")
        answer = full[len(prompt):]
        # The trailing newline after the end-of-turn token is layout, not something to learn.
        trimmed = answer.rstrip("\n")
        segments += [(prompt[len(done):], False), (trimmed, True)]
        done = prompt + trimmed
    return segments


def _render_chatml(messages: list[dict]) -> list[tuple[str, bool]]:
    segments: list[tuple[str, bool]] = []
    for m in messages:
        head = f"<|im_start|>{m['role']}\n"
        if m["role"] == "assistant":
            segments += [(head, False), (m["content"] + "<|im_end|>", True), ("\n", False)]
        else:
            segments.append((head + m["content"] + "<|im_end|>\n", False))
    return segments


def _render_human_assistant(messages: list[dict], eos: str) -> list[tuple[str, bool]]:
    segments: list[tuple[str, bool]] = []
    for m in messages:
        if m["role"] == "system":
            segments.append((m["content"] + "\n\n", False))
        elif m["role"] == "user":
            segments.append((f"Human: {m['content']}\nAssistant: ", False))
        else:
            segments += [(m["content"] + eos, True), ("\n", False)]
    return segments


def render_segments(example: dict, template: str, tokenizer: Any, where: str = "example") -> list[tuple[str, bool]]:
    """(text, trained) segments of one normalised example (see formats.py)."""
    if "text" in example:
        return [(example["text"] + (tokenizer.eos_token or ""), True)]
    messages = example["messages"]
    if template == "tokenizer":
        return _render_tokenizer(tokenizer, messages, where)
    if template == "chatml":
        return _render_chatml(messages)
    if template == "human-assistant":
        return _render_human_assistant(messages, tokenizer.eos_token or "")
    raise LorakitError(f"unknown template {template!r}")  # resolve_template guards this


def generation_prompt(messages: list[dict], template: str, tokenizer: Any) -> str:
    """The text a model continues from to answer the last user turn."""
    if template == "tokenizer":
        return tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    segments = render_segments({"messages": messages + [{"role": "assistant", "content": ""}]}, template, tokenizer)
    text = ""
    for seg, trained in segments:
        if trained:
            break
        text += seg
    return text


def encode_example(example: dict, template: str, tokenizer: Any, train_on_prompt: bool = False,
                   where: str = "example", final_only: bool = False) -> Encoded:
    """Tokenize segment by segment; labels are the ids of trained segments, -100 elsewhere
    (``final_only``: of the last trained segment only, the answer a preference pair scores)."""
    segments = render_segments(example, template, tokenizer, where)
    last = max((i for i, (_, trained) in enumerate(segments) if trained), default=-1)
    ids: list[int] = []
    labels: list[int] = []
    for i, (text, trained) in enumerate(segments):
        if not text:
            continue
        seg = tokenizer(text, add_special_tokens=False)["input_ids"]
        ids += seg
        keep = i == last if final_only else (trained or train_on_prompt)
        labels += seg if keep else [-100] * len(seg)
    return Encoded(ids, labels)
