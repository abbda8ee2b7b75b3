"""Compute pieces lorakit plugs into a transformers model through its stable seams: per-document
attention for packed rows (``attention``) and the label-only chunked cross-entropy (``loss``).

May import: torch, transformers, ``lorakit.errors``. Used by quantization (calibration runs
packed rows), training and evaluation."""
