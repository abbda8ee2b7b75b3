"""Memory-estimate arithmetic on hand-computed values (the activation model awaits validation)."""

import pytest
from transformers import LlamaConfig

from lorakit import LorakitError
from lorakit.estimate import BITS_NF4, BITS_NF4_DOUBLE_QUANT, estimate_memory, parse_size, shape_from_config

SMOL = LlamaConfig(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                   num_attention_heads=9, num_key_value_heads=3, tie_word_embeddings=True)


def test_shape_and_parameter_count_match_smollm2():
    s = shape_from_config(SMOL)
    assert s.kv_dim == 192 and s.total_params == 134_515_008  # SmolLM2-135M's real count


def test_seeds_worked_example_and_adapter_counts():
    e = estimate_memory(shape_from_config(SMOL), "lora", r=8, targets=["q_proj"], batch=1, seq=16)
    q = e.adapter_by_type["q_proj"]
    assert q["params_per_layer"] == 9_216 and q["saved_pct"] == pytest.approx(100 * (1 - 9216 / 576 ** 2))
    full = estimate_memory(shape_from_config(SMOL), "lora", r=16, batch=1, seq=16)
    assert full.trainable_params == 4_884_480  # = get_lora_model(..., r=16, all-linear) on SmolLM2
    assert full.components["adapter parameters (fp32)"] == 4_884_480 * 4
    assert full.components["optimizer state (adamw)"] == 4_884_480 * 8


def test_nf4_bits_and_quantized_weight_bytes():
    assert BITS_NF4 == 4.5 and BITS_NF4_DOUBLE_QUANT == pytest.approx(4.127, abs=1e-3)
    s = shape_from_config(SMOL)
    e = estimate_memory(s, "qlora", r=16, batch=1, seq=16)
    linear = s.layers * s.layer_linear_params
    assert e.components[f"frozen linear weights (NF4, {BITS_NF4_DOUBLE_QUANT:.3f} bits)"] == pytest.approx(linear * BITS_NF4_DOUBLE_QUANT / 8)


def test_sizes_and_bad_numbers():
    assert parse_size("24GB") == 24 * 2**30 and parse_size("512 MiB") == 512 * 2**20
    with pytest.raises(LorakitError, match="memory size"):
        parse_size("lots")
    with pytest.raises(LorakitError, match="at least 1"):
        estimate_memory(shape_from_config(SMOL), batch=0)
    with pytest.raises(LorakitError, match="match none"):
        estimate_memory(shape_from_config(SMOL), targets=["wq"])
