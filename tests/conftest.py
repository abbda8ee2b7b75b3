"""Tiny models built from configs (no hub): Llama-like, GPT-2, BLOOM-like, a Conv2d net."""

from __future__ import annotations

import copy
import logging
import os
import warnings

import pytest
import torch
from torch import nn

warnings.filterwarnings("ignore", message=".*(bos|eos|pad)_token_id.*")
logging.getLogger("transformers").setLevel(logging.ERROR)
# The README's test command runs two pytest-xdist workers (pyproject's addopts). Each computes on
# one thread, and so do the programs its tests start: two workers then share the 2 cores instead of
# oversubscribing them (OpenMP threads beyond the cores spin and slow everyone down).
if os.environ.get("PYTEST_XDIST_WORKER"):
    os.environ["OMP_NUM_THREADS"] = "1"
    torch.set_num_threads(1)
else:
    torch.set_num_threads(2)
# Training precision "auto" picks bf16 on CPUs with native bf16 matmuls; tests compare numbers at
# fp32 tolerances and must give the same results on any CI machine, so they pin fp32 (subprocesses
# inherit this). tests/test_precision.py turns it on where it tests the bf16 path itself.
os.environ["LORAKIT_CPU_BF16"] = "0"

VOCAB = 96


def tiny_llama(tie: bool = False, seed: int = 0) -> nn.Module:
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(seed)
    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
                      tie_word_embeddings=tie, bos_token_id=1, eos_token_id=2, pad_token_id=0)
    return LlamaForCausalLM(cfg).eval()


def tiny_gpt2(seed: int = 0) -> nn.Module:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=VOCAB, n_embd=64, n_layer=2, n_head=4, n_positions=128,
                     bos_token_id=1, eos_token_id=2)
    return GPT2LMHeadModel(cfg).eval()


def tiny_bloom(seed: int = 0) -> nn.Module:
    from transformers import BloomConfig, BloomForCausalLM

    torch.manual_seed(seed)
    cfg = BloomConfig(vocab_size=VOCAB, hidden_size=64, n_layer=2, n_head=4, bos_token_id=1, eos_token_id=2)
    return BloomForCausalLM(cfg).eval()


class TinyConvNet(nn.Module):
    """A small CNN: two 3×3 convs, a 1×1 conv and a linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, 3, padding=1)
        self.conv2 = nn.Conv2d(8, 16, 3, stride=2, padding=1)
        self.conv3 = nn.Conv2d(16, 16, 1)
        self.head = nn.Linear(16, 5)

    def forward(self, x):
        x = torch.relu(self.conv1(x))
        x = torch.relu(self.conv2(x))
        x = torch.relu(self.conv3(x))
        return self.head(x.mean((2, 3)))


def tiny_convnet(seed: int = 0) -> nn.Module:
    torch.manual_seed(seed)
    return TinyConvNet().eval()


def randomize_adapters(model: nn.Module, seed: int = 1, std: float = 0.1) -> None:
    """Give every trainable tensor random values so adapters have a visible effect."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, p in sorted(model.named_parameters()):
            if p.requires_grad:
                p.copy_(torch.randn(p.shape, generator=g) * std)


def snapshot(model: nn.Module) -> tuple[dict, dict]:
    """State (tensors cloned) and module types, to prove a failed call changed nothing."""
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    types = {n: type(m) for n, m in model.named_modules()}
    return state, types


def assert_unchanged(model: nn.Module, snap: tuple[dict, dict]) -> None:
    state, types = snap
    assert {n: type(m) for n, m in model.named_modules()} == types
    now = model.state_dict()
    assert now.keys() == state.keys()
    for k, v in state.items():
        assert torch.equal(now[k], v), k


@pytest.fixture
def ids() -> torch.Tensor:
    return torch.randint(3, VOCAB, (3, 12), generator=torch.Generator().manual_seed(7))


__all__ = ["tiny_llama", "tiny_gpt2", "tiny_bloom", "tiny_convnet", "randomize_adapters", "snapshot",
           "assert_unchanged", "copy", "VOCAB"]


CHATML = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
          "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")


def build_tokenizer():
    """A small byte-level BPE tokenizer trained on a generated corpus, with a ChatML chat template."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    words = ["date", "convert", "normalize", "who", "are", "you", "answer", "the", "a", "is", "of", "to", "format",
             "January", "February", "March", "April", "May", "June", "July", "August", "September", "October",
             "November", "December", "hello", "world", "assistant", "user", "system", "Kit", "lorakit", "I", "am"]
    corpus = [" ".join(words[(i * 7 + j) % len(words)] for j in range(12)) + f" {i} {2000 + i % 50}-{i % 12 + 1:02d}"
              for i in range(400)]
    tok = Tokenizer(models.BPE(unk_token=None))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    special = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=300, special_tokens=special,
                                                         initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   bos_token="<|im_start|>")
    fast.chat_template = CHATML
    return fast


@pytest.fixture(scope="session")
def tiny_model_dir(tmp_path_factory):
    """A local transformers folder: a tiny Llama + the generated tokenizer (what `--model DIR` reads)."""
    from transformers import LlamaConfig, LlamaForCausalLM

    folder = tmp_path_factory.mktemp("tiny-llama")
    tok = build_tokenizer()
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                      eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id)
    LlamaForCausalLM(cfg).save_pretrained(folder)
    tok.save_pretrained(folder)
    return folder


@pytest.fixture(autouse=True)
def _isolated_cache(tmp_path, monkeypatch):
    """Tokenized-data and model caches go to a per-test folder."""
    monkeypatch.setenv("LORAKIT_CACHE", str(tmp_path / "lorakit-cache"))


@pytest.fixture(scope="session")
def two_adapters(tiny_model_dir, tmp_path_factory):
    """Two adapters on the tiny model whose greedy outputs differ from each other and the base."""
    from transformers import AutoModelForCausalLM

    from lorakit import LoraConfig, get_lora_model

    folder = tmp_path_factory.mktemp("adapters")
    paths = {}
    for i, name in enumerate(["alpha", "beta"]):
        lm = get_lora_model(AutoModelForCausalLM.from_pretrained(tiny_model_dir),
                            LoraConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]))
        randomize_adapters(lm, seed=10 + i, std=0.6)
        lm.save_pretrained(folder / name)
        paths[name] = folder / name
    return paths


def adding_data(tmp_path) -> "Path":
    """train.jsonl in ``tmp_path``: 24 alpaca rows "add i and i" -> "2i"."""
    import json

    data = tmp_path / "train.jsonl"
    data.write_text("".join(json.dumps({"instruction": f"add {i} and {i}", "output": str(2 * i)}) + "\n" for i in range(24)))
    return data


def interrupt_at(monkeypatch, step: int) -> None:
    """Make the next training run stop after ``step`` as Ctrl-C would (SIGINT once the step is logged)."""
    import os
    import signal

    import lorakit.training.runlog as runlog

    original = runlog.RunLog.step

    def step_then_signal(self, s, *a, **k):
        original(self, s, *a, **k)
        if s == step:
            os.kill(os.getpid(), signal.SIGINT)

    monkeypatch.setattr(runlog.RunLog, "step", step_then_signal)


def tiny_train_cmd(model_dir, tmp_path, *flags: str) -> tuple[list[str], "Path"]:
    """A short `lorakit train` command line on 24 alpaca rows ("add i and i") over ``model_dir``,
    and its run folder; ``flags`` add to (or, given twice, override) the common ones."""
    import sys

    data = adding_data(tmp_path)
    run = tmp_path / "run"
    return ([sys.executable, "-m", "lorakit", "train", "--model", str(model_dir), "--data", str(data), "--out", str(run),
             *flags, "--data.max_len", "48", "--data.val_size", "4", "--train.threads", "1", "--train.plot", "false"], run)


def pytest_collection_modifyitems(config, items):
    """With several workers, the slow end-to-end tests start first, so the suite does not end with
    one of them running alone while the other worker idles."""
    if getattr(config.option, "numprocesses", None):
        items.sort(key=lambda item: item.get_closest_marker("slow") is None)  # stable: file order otherwise
