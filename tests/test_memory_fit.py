"""A run too big for the memory it has adapts (checkpointing, then smaller micro-batches with more
accumulation) or stops before loading anything, with the numbers; memory faked with $LORAKIT_AVAILABLE_MEMORY."""

import subprocess

import pytest
from transformers import LlamaConfig

from conftest import tiny_train_cmd
from lorakit import LorakitError
from lorakit.config import run_config_from_dict
from lorakit.planning.estimate import shape_from_config
from lorakit.planning.fit import CPU_RSS_RATIO, HEADROOM, fit_to_memory, rss_ratio

SMOL = shape_from_config(LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                                     num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True))
OVERHEAD = 420 * 2**20


def _cfg(batch=8, accum=1, max_len=1024, ckpt=False):
    return run_config_from_dict({"train": {"batch_size": batch, "grad_accum": accum, "grad_checkpointing": ckpt},
                                 "data": {"max_len": max_len}})


def _peak(cfg):
    return fit_to_memory(SMOL, cfg, "bf16", OVERHEAD, float("inf")).estimate


def test_a_run_that_fits_is_left_alone():
    cfg = _cfg()
    fit = fit_to_memory(SMOL, cfg, "bf16", OVERHEAD, _peak(cfg) / HEADROOM + 1)
    assert (fit.batch_size, fit.grad_accum, fit.grad_checkpointing, fit.changes) == (8, 1, False, [])


def test_checkpointing_first_then_smaller_micro_batches_with_the_same_rows_per_step():
    cfg = _cfg(batch=8, accum=2)
    with_ckpt = _peak(_cfg(batch=8, accum=2, ckpt=True))
    fit = fit_to_memory(SMOL, cfg, "bf16", OVERHEAD, with_ckpt / HEADROOM + 1)
    assert (fit.batch_size, fit.grad_accum, fit.grad_checkpointing) == (8, 2, True)
    assert len(fit.changes) == 1 and "grad_checkpointing" in fit.changes[0]
    two_rows = _peak(_cfg(batch=2, accum=8, ckpt=True))
    assert two_rows < with_ckpt
    fit = fit_to_memory(SMOL, cfg, "bf16", OVERHEAD, two_rows / HEADROOM + 1)
    assert (fit.batch_size, fit.grad_accum, fit.grad_checkpointing) == (2, 8, True)  # still 16 rows per step
    assert fit.estimate <= HEADROOM * (two_rows / HEADROOM + 1)
    assert "train.batch_size 8 → 2 and train.grad_accum 2 → 8" in fit.changes[1]


def test_when_nothing_fits_the_message_has_the_numbers_and_a_max_len_that_fits():
    cfg = _cfg(max_len=4096)
    one_row_2k = _peak(_cfg(batch=1, max_len=2048, ckpt=True))
    with pytest.raises(LorakitError, match=r"needs about [0-9.]+ GiB .* 1 row of 4096 tokens .* is available") as err:
        fit_to_memory(SMOL, cfg, "bf16", OVERHEAD, one_row_2k / HEADROOM + 1)
    longest = int(str(err.value).split("data.max_len ")[1].split()[0])
    assert 2048 <= longest < 4096
    assert _peak(_cfg(batch=1, max_len=longest, ckpt=True)) <= one_row_2k + 1  # the suggestion does fit


def test_on_cpu_the_plan_counts_the_rss_above_the_live_tensors():
    # measured under mimalloc: peak RSS 1.16-1.21x the estimate in bf16 — a run planned at 90% of the
    # memory by its live tensors alone would reach ~109% of it
    assert rss_ratio("cpu", "bf16") == CPU_RSS_RATIO["bf16"] > 1.15 and rss_ratio("cuda", "bf16") == 1.0
    cfg = _cfg()
    available = _peak(cfg) / HEADROOM * 1.05  # fits by the live tensors, not by the process's peak
    assert fit_to_memory(SMOL, cfg, "bf16", OVERHEAD, available).changes == []
    fit = fit_to_memory(SMOL, cfg, "bf16", OVERHEAD, available, rss_ratio("cpu", "bf16"))
    assert fit.grad_checkpointing and "grad_checkpointing" in fit.changes[0]
    assert fit.expected_peak == pytest.approx(fit.estimate * CPU_RSS_RATIO["bf16"])
    assert fit.expected_peak <= HEADROOM * available
    with pytest.raises(LorakitError, match=r"needs about [0-9.]+ GiB \(about [0-9.]+ GiB resident\)"):
        fit_to_memory(SMOL, _cfg(max_len=4096), "bf16", OVERHEAD, OVERHEAD * 1.5, rss_ratio("cpu", "bf16"))


def test_train_adapts_or_stops_before_loading_the_data(tiny_model_dir, tmp_path):
    from lorakit.base import load_model_config

    shape = shape_from_config(load_model_config(str(tiny_model_dir)))
    cfg = run_config_from_dict({"model": {"name": str(tiny_model_dir)}, "data": {"max_len": 48},
                                "train": {"batch_size": 4, "grad_checkpointing": True, "precision": "fp32"}})
    one_row = fit_to_memory(shape, run_config_from_dict({**cfg.to_dict(), "train": {**cfg.to_dict()["train"],
                                                                                     "batch_size": 1}}),
                            "fp32", OVERHEAD, float("inf")).estimate
    cmd, run = tiny_train_cmd(tiny_model_dir, tmp_path, "--train.batch_size", "4", "--train.max_steps", "2",
                              "--train.grad_checkpointing", "true", "--train.precision", "fp32")
    # on CPU the run plans its estimate times the measured RSS ratio
    small = dict(LORAKIT_AVAILABLE_MEMORY=str(int(one_row * CPU_RSS_RATIO["fp32"] / HEADROOM) + 1024))
    import os

    done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **small}, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    assert "memory: to fit, train.batch_size 4 → 1 and train.grad_accum 1 → 4" in done.stdout
    saved = (run / "config.yaml").read_text()
    assert "batch_size: 1" in saved and "grad_accum: 4" in saved  # the run folder says what ran
    none = dict(LORAKIT_AVAILABLE_MEMORY=str(int(one_row / 2)))
    done = subprocess.run([*cmd[:cmd.index("--out") + 1], str(tmp_path / "never"), *cmd[cmd.index("--out") + 2:]],
                          capture_output=True, text=True, env={**os.environ, **none}, timeout=300)
    assert done.returncode == 2 and "needs about" in done.stderr and "is available" in done.stderr, done.stderr[-2000:]
    assert "data:" not in done.stdout and not (tmp_path / "never").exists()  # stopped before the data and the folder
