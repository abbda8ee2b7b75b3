"""The CNN LoRA example: adapting the last three convolutions lifts the shifted task's accuracy,
the merged model predicts identically, and layer-wise ranks are what was configured."""

import re
import subprocess
import sys
from pathlib import Path

import torch
from torch import nn

ROOT = Path(__file__).resolve().parents[1]


def test_cnn_example_adapts_and_merges_identically():
    done = subprocess.run([sys.executable, str(ROOT / "examples" / "cnn_lora.py"), "--pretrain-steps", "300",
                           "--adapt-steps", "400"], capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-2000:]
    out = done.stdout
    base, adapted = (float(x) for x in re.search(r"\(shifted shapes\)\s+([\d.]+)%\s+([\d.]+)%", out).groups())
    assert base < 50 and adapted > base + 30, out
    assert re.search(r"task B accuracy ([\d.]+)%, 100\.0% of predictions identical", out), out
    assert "adapter disabled: 100.0%" in out or "adapter disabled: 99." in out, out


def test_per_layer_conv_ranks_and_last_modules():
    sys.path.insert(0, str(ROOT / "examples"))
    from cnn_lora import SmallCNN

    from lorakit import LoraConfig, get_lora_model
    from lorakit.core.inject import last_modules

    model = SmallCNN()
    convs = last_modules(model, nn.Conv2d, 3)
    assert convs == ["conv2", "conv3", "conv4"]
    lm = get_lora_model(model, LoraConfig(r=4, target_modules=convs, rank_pattern={"conv2": 16, "conv3": 8}))
    ranks = {n: m.r["default"] for n, m in lm.model.named_modules() if hasattr(m, "lora_A")}
    assert ranks == {"conv2": 16, "conv3": 8, "conv4": 4}
    # A on a conv is a conv with the base's kernel (r, in, 3, 3); B a 1×1 conv (out, r, 1, 1).
    assert lm.model.conv2.lora_A["default"].shape == (16, 16, 3, 3)
    assert lm.model.conv2.lora_B["default"].shape == (32, 16, 1, 1)
    x = torch.randn(2, 1, 32, 32)
    with torch.no_grad():
        assert torch.equal(lm(x), SmallCNN.forward(lm.model, x))
