"""Run GGUF files in a real llama.cpp (node-llama-cpp's prebuilt CPU build, installed by
``scripts/setup test`` into tests/llama_cpp/node_modules) and compare with lorakit."""

from __future__ import annotations

import json
import shutil
import subprocess
import tempfile
from pathlib import Path

HERE = Path(__file__).resolve().parent / "llama_cpp"


def available() -> bool:
    return shutil.which("node") is not None and (HERE / "node_modules" / "node-llama-cpp").is_dir()


def run_llama_cpp(model: Path, prompts: list[list[int]], max_tokens: int, lora: Path | None = None,
                  texts: list[str] | None = None) -> dict:
    """Greedy token ids for each prompt (token ids in), llama.cpp's tokenization of ``texts``,
    and the top-5 next-token probabilities after each prompt."""
    job = {"model": str(model), "prompts": prompts, "max_tokens": max_tokens, "texts": texts or []}
    if lora is not None:
        job["lora"] = [{"path": str(lora), "scale": 1.0}]
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(job, f)
    try:
        proc = subprocess.run(["node", str(HERE / "run.mjs"), f.name], capture_output=True, text=True, timeout=600)
    finally:
        Path(f.name).unlink()
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])
