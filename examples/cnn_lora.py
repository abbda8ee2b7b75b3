"""LoRA on a CNN: pre-train a small convnet on one synthetic image task, then adapt its last three
convolutions with LoRA (a larger rank where the feature maps are larger) to a shifted task.

    .venv/bin/python examples/cnn_lora.py [--seed 0]

Task A: four shapes (square, disc, triangle, cross) drawn bright on a dark, noisy background.
Task B: the same four classes drawn dark on a bright background crossed by diagonal stripes —
the pre-trained net mostly fails on it. Only the LoRA factors train in step 2 (the base and
its head stay frozen); the script prints accuracy before/after, the trainable share, and the
merged model's accuracy (identical predictions, zero added latency).
"""

from __future__ import annotations

import argparse
import time

import torch
import torch.nn.functional as F
from torch import nn

from lorakit import LoraConfig, get_lora_model
from lorakit.core.inject import last_modules

SIZE = 32
CLASSES = ("square", "disc", "triangle", "cross")


class SmallCNN(nn.Module):
    """Four 3×3 conv blocks (32→16→8→4 pixels) and a linear head: ~60k parameters."""

    def __init__(self, channels=(16, 32, 64, 64), classes: int = len(CLASSES)) -> None:
        super().__init__()
        c1, c2, c3, c4 = channels
        self.conv1 = nn.Conv2d(1, c1, 3, padding=1)
        self.conv2 = nn.Conv2d(c1, c2, 3, padding=1)
        self.conv3 = nn.Conv2d(c2, c3, 3, padding=1)
        self.conv4 = nn.Conv2d(c3, c4, 3, padding=1)
        self.head = nn.Linear(c4, classes)

    def forward(self, x):
        x = F.max_pool2d(F.relu(self.conv1(x)), 2)  # 16×16
        x = F.max_pool2d(F.relu(self.conv2(x)), 2)  # 8×8
        x = F.max_pool2d(F.relu(self.conv3(x)), 2)  # 4×4
        x = F.relu(self.conv4(x))
        return self.head(x.mean((2, 3)))


def shapes(n: int, shifted: bool, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` images (1×32×32) and labels; ``shifted`` draws task B's domain."""
    labels = torch.randint(0, len(CLASSES), (n,), generator=gen)
    cx, cy = (torch.rand(2, n, 1, 1, generator=gen) * 12 + 10)
    s = torch.rand(n, 1, 1, generator=gen) * 4 + 5
    y, x = torch.meshgrid(torch.arange(SIZE, dtype=torch.float32), torch.arange(SIZE, dtype=torch.float32), indexing="ij")
    dx, dy = x - cx, y - cy
    masks = torch.stack([
        (dx.abs() <= s) & (dy.abs() <= s),
        dx ** 2 + dy ** 2 <= s ** 2,
        (dy >= -s) & (dy <= s) & (dx.abs() <= (dy + s) / 2),
        ((dx.abs() <= s / 3) & (dy.abs() <= s)) | ((dy.abs() <= s / 3) & (dx.abs() <= s)),
    ], 1).float()  # (n, 4, H, W)
    mask = masks[torch.arange(n), labels]
    noise = torch.randn(n, SIZE, SIZE, generator=gen) * 0.1
    if shifted:
        stripes = 0.25 * torch.sin((x + y) * 1.3)
        img = 0.9 - 0.7 * mask + stripes + noise
    else:
        img = mask + noise
    return img.unsqueeze(1), labels


def fit(model: nn.Module, data, steps: int, lr: float, gen: torch.Generator, batch: int = 64) -> None:
    params = [p for p in model.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=lr)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=lr, total_steps=steps)
    x, y = data
    model.train()
    for _ in range(steps):
        idx = torch.randint(0, len(y), (batch,), generator=gen)
        loss = F.cross_entropy(model(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
        sched.step()
    model.eval()


@torch.no_grad()
def predict(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    model.eval()
    return torch.cat([model(x[i:i + 512]).argmax(-1) for i in range(0, len(x), 512)])


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--pretrain-steps", type=int, default=400)
    ap.add_argument("--adapt-steps", type=int, default=800)
    args = ap.parse_args()
    t0 = time.perf_counter()
    gen = torch.Generator().manual_seed(args.seed)
    torch.manual_seed(args.seed)
    train_a, test_a = shapes(4000, False, gen), shapes(1000, False, gen)
    train_b, test_b = shapes(4000, True, gen), shapes(1000, True, gen)

    model = SmallCNN()
    fit(model, train_a, args.pretrain_steps, 3e-3, gen)
    acc = lambda m, d: (predict(m, d[0]) == d[1]).float().mean().item()  # noqa: E731
    base_a, base_b = acc(model, test_a), acc(model, test_b)
    print(f"pre-trained on task A: accuracy A {base_a:.1%}, B {base_b:.1%} (B is the shifted task)")

    convs = last_modules(model, nn.Conv2d, 3)  # conv2, conv3, conv4
    # Larger rank where the feature maps are larger (16×16 → 16, 8×8 → 8, 4×4 → 4).
    ranks = dict(zip(convs, (16, 8, 4)))
    cfg = LoraConfig(r=4, alpha=8, target_modules=convs, rank_pattern=ranks, alpha_pattern={k: 2 * v for k, v in ranks.items()})
    lm = get_lora_model(model, cfg)
    print(lm.trainable_report()[0])
    fit(lm, train_b, args.adapt_steps, 1e-2, gen)
    after_b, after_a = acc(lm, test_b), acc(lm, test_a)
    with lm.disable_adapter():
        still_a = acc(lm, test_a)
    unmerged = predict(lm, test_b[0])
    merged = lm.merge_and_unload()
    same = (predict(merged, test_b[0]) == unmerged).float().mean().item()
    print(f"\n  {'task B accuracy':<28}{'base':>8}{'with LoRA':>12}")
    print(f"  {'(shifted shapes)':<28}{base_b:>8.1%}{after_b:>12.1%}")
    print(f"  task A with the adapter: {after_a:.1%}; adapter disabled: {still_a:.1%} (the base is untouched)")
    print(f"  merged model: task B accuracy {acc(merged, test_b):.1%}, {same:.1%} of predictions identical to unmerged")
    print(f"  wall time {time.perf_counter() - t0:.0f} s")


if __name__ == "__main__":
    main()
