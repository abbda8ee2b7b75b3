"""``--to vllm``: a PEFT folder vLLM's LoRA loader accepts, and the ``vllm serve`` line for it.

The rules, read from vLLM's ``vllm/lora/peft_helper.py`` (``PEFTHelper.validate_legal`` and
``_validate_features``) as of 2026 and from releases before per-module patterns (0.11):
- the rank must not exceed ``--max-lora-rank``, which takes 1, 8, 16, 32, 64, 128, 256, 320 or 512
  (default 16);
- ``modules_to_save`` (other than a classifier head), DoRA, ``bias != "none"``, ``lora_bias`` and
  inits that change the base weights (PiSSA, OLoRA, LoftQ, CorDA) are refused;
- rsLoRA is honoured; ``rank_pattern``/``alpha_pattern`` are honoured only by recent releases —
  older ones silently apply the global ``alpha/r`` to every module.
So the export folds every module's scale into B (one ``lora_alpha``, no patterns, no rsLoRA) and
zero-pads every module to one allowed rank: identical outputs in PEFT and in any vLLM release.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from safetensors.torch import save_file

from ..atomic import atomic_dir
from ..core.peft_format import CONFIG_NAME, PREFIX, WEIGHTS_NAME
from ..errors import LorakitError
from ..training.model_card import VLLM_RANKS, vllm_max_lora_rank
from .adapter import ExportAdapter, refuse, uniform

__all__ = ["write_vllm", "check_vllm", "serve_line"]

_WAY_OUT = "merge first (lorakit merge) and serve the merged folder"
_BASE_CHANGING_INITS = ("pissa", "olora", "loftq", "corda")


def _allowed_rank(adapter: ExportAdapter, rank: int | None) -> int:
    largest = max(f.r for f in adapter.factors)
    want = rank if rank is not None else vllm_max_lora_rank(largest)
    if want is None:
        raise LorakitError(f"{adapter.folder}: rank {largest} is above 512, the largest --max-lora-rank vLLM takes")
    if want not in VLLM_RANKS or want < largest:
        raise LorakitError(f"--rank {want}: vLLM takes {', '.join(map(str, VLLM_RANKS))}, at least the adapter's "
                           f"largest rank {largest}")
    return want


def serve_line(base: str, name: str, folder: Path, rank: int) -> str:
    return (f"vllm serve {base} --enable-lora --lora-modules {name}={folder.resolve()} --max-lora-rank {rank}")


def write_vllm(adapter: ExportAdapter, out: str | os.PathLike, rank: int | None = None) -> tuple[Path, int]:
    """Write a vLLM-ready PEFT folder at ``out``; returns it and its rank (the --max-lora-rank)."""
    refuse(adapter, "vLLM", way_out=_WAY_OUT)
    if adapter.config.fan_in_fan_out:
        raise LorakitError(f"{adapter.folder}: a GPT-2 Conv1D adapter (fan_in_fan_out); vLLM has no LoRA for GPT-2. "
                           f"{_WAY_OUT[0].upper() + _WAY_OUT[1:]}")
    for f in adapter.factors:
        if f.A.dim() != 2:
            raise LorakitError(f"{adapter.folder}: module {f.path!r} is a convolution LoRA; vLLM serves language "
                               "models' linear and embedding layers only")
    r = _allowed_rank(adapter, rank)
    factors, scale = uniform(adapter, rank=r)
    state = {}
    for f in factors:
        a, b = ("lora_embedding_A", "lora_embedding_B") if f.embedding else ("lora_A.weight", "lora_B.weight")
        state[f"{PREFIX}{f.path}.{a}"] = f.A.contiguous()
        state[f"{PREFIX}{f.path}.{b}"] = f.B.contiguous()
    config = json.loads((adapter.folder / CONFIG_NAME).read_text())
    config.update(r=r, lora_alpha=scale * r, use_rslora=False, rank_pattern={}, alpha_pattern={},
                  init_lora_weights=True)
    out = Path(out)
    with atomic_dir(out) as tmp:
        save_file(state, str(tmp / WEIGHTS_NAME), metadata={"format": "pt"})
        (tmp / CONFIG_NAME).write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")
    return out, r


def check_vllm(folder: str | os.PathLike) -> list[str]:
    """What vLLM's loader would refuse or misread in a PEFT folder (empty: fine)."""
    folder = Path(folder)
    path = folder / CONFIG_NAME
    if not path.is_file():
        return [f"{path} is missing"]
    try:
        cfg = json.loads(path.read_text())
    except json.JSONDecodeError as err:
        return [f"{path}:{err.lineno}: not valid JSON ({err.msg})"]
    problems = []
    ranks = [cfg.get("r", 0), *(cfg.get("rank_pattern") or {}).values()]
    if max(ranks) > VLLM_RANKS[-1]:
        problems.append(f"rank {max(ranks)} is above 512, the largest --max-lora-rank vLLM takes")
    saved = [m for m in cfg.get("modules_to_save") or [] if m not in ("classifier", "score")]
    if saved:
        problems.append(f"modules_to_save={saved}: vLLM refuses full module copies; {_WAY_OUT}")
    if cfg.get("use_dora"):
        problems.append(f"DoRA (use_dora): vLLM does not support it; {_WAY_OUT}")
    if cfg.get("bias", "none") != "none" or cfg.get("lora_bias"):
        problems.append(f"trained biases (bias={cfg.get('bias')!r}, lora_bias={cfg.get('lora_bias')!r}): vLLM refuses them")
    init = cfg.get("init_lora_weights", True)
    if isinstance(init, str) and init.lower().startswith(_BASE_CHANGING_INITS):
        problems.append(f"init_lora_weights={init!r} changes the base weights at load time; vLLM refuses it")
    if cfg.get("rank_pattern") or cfg.get("alpha_pattern"):
        problems.append("rank_pattern/alpha_pattern: vLLM releases before pattern support apply the global alpha/r to "
                        "every module; lorakit export --to vllm folds them into the factors")
    return problems
