"""Human-readable summaries printed at the end of a command."""

from __future__ import annotations

from ..config import WEIGHT_METHODS, RunConfig

__all__ = ["print_train_summary"]


def _fmt(v: float | None, fmt: str) -> str:
    return "-" if v is None or v != v else fmt.format(v)


def print_train_summary(result, cfg: RunConfig) -> None:
    r = result
    weights = cfg.train.method in WEIGHT_METHODS  # a full/freeze run: a model folder, no adapter
    print()
    print(f"run folder:   {r.out_dir}")
    if weights:
        print(f"model:        {r.adapter_dir}  ({'checkpoint: resume to finish' if r.interrupted else 'transformers folder, float32'})")
    else:
        print(f"adapter:      {r.adapter_dir}  (PEFT format)")
    print(f"steps:        {r.steps}   tokens seen: {r.tokens:,d}   training: {r.train_s:.0f}s   whole run: {r.wall_s:.0f}s")
    print(f"throughput:   {r.tokens_per_s:.0f} tokens/s   peak memory: {r.peak_memory_mb:.0f} MiB   final train loss: {r.final_loss:.4f}")
    if r.peak_flops > 0:
        print(f"MFU:          {100 * r.mfu:.0f}% of a {r.peak_flops / 1e9:.0f} GFLOP/s matmul peak (the better of "
              "two measurements, before and after the loop; the model's matmul FLOPs per token and the head's per label "
              "position, times their rates; docs/training.md)")
    if r.interrupted:
        return
    from ..training.model_card import SCORE_ROWS

    rows = [(label, key, fmt) for label, key, fmt in SCORE_ROWS if key in r.after or key in r.before]
    print()
    if not rows:
        print("  no held-out evaluation (data.val_size 0 and no data.eval_path)")
    else:
        trained = "fine-tuned" if weights else "with adapter"
        print(f"  {'held-out':<14}{r.before_label:>12}{trained:>16}")
    for label, key, fmt in rows:
        print(f"  {label:<14}{_fmt(r.before.get(key), fmt):>12}{_fmt(r.after.get(key), fmt):>16}")
    if r.samples:
        print()
        for q, base, new in r.samples:
            print(f"  Q: {q!r}")
            print(f"     {r.before_label + ':':<9}{base!r}")
            print(f"     {('tuned:' if weights else 'adapter:'):<9}{new!r}")
