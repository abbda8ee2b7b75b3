"""LoRA around ``nn.Embedding`` and ``nn.Conv2d`` (the factor layouts PEFT uses for them)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .layers import LoraLayer

__all__ = ["LoraEmbedding", "LoraConv2d"]


class LoraEmbedding(LoraLayer):
    """LoRA around ``nn.Embedding`` (weight (num, dim)); A is (r, num) zero-init, B is (dim, r) normal-init."""

    def __init__(self, base_layer: nn.Embedding) -> None:
        super().__init__(base_layer)
        self.num_embeddings, self.embedding_dim = base_layer.weight.shape

    def _factor_shapes(self, r: int):
        return (r, self.num_embeddings), (self.embedding_dim, r)

    def _init_factors(self, name: str, init: str) -> None:
        # Zero A, normal B (PEFT's choice; 'gaussian' means the same here).
        with torch.no_grad():
            nn.init.zeros_(self.lora_A[name])
            nn.init.normal_(self.lora_B[name])

    def lora_output(self, x: Tensor, name: str) -> Tensor:
        A, B = self.lora_A[name], self.lora_B[name]
        base = self.base_layer
        h = F.embedding(x, A.t(), padding_idx=base.padding_idx, max_norm=base.max_norm,
                        norm_type=base.norm_type, scale_grad_by_freq=base.scale_grad_by_freq,
                        sparse=base.sparse)  # (..., r); dropout does not apply to token ids
        return F.linear(h, B) * self.scaling[name]  # (..., dim)

    def delta_weight(self, name: str) -> Tensor:
        A, B = self._factors(name)
        return ((B @ A) * self.scaling[name]).t()  # (num, dim)


class LoraConv2d(LoraLayer):
    """LoRA around ``nn.Conv2d``: A is a conv with the base's kernel/stride/padding/dilation, B a 1×1 conv."""

    def __init__(self, base_layer: nn.Conv2d) -> None:
        super().__init__(base_layer)
        if base_layer.groups != 1:
            raise ValueError(f"LoRA on grouped convolutions (groups={base_layer.groups}) is not supported")
        self.in_channels, self.out_channels = base_layer.in_channels, base_layer.out_channels

    def _factor_shapes(self, r: int):
        kh, kw = self.base_layer.kernel_size
        return (r, self.in_channels, kh, kw), (self.out_channels, r, 1, 1)

    def lora_output(self, x: Tensor, name: str) -> Tensor:
        A, B, base = self.lora_A[name], self.lora_B[name], self.base_layer
        x = self.lora_dropout[name](x).to(A.dtype)
        h = F.conv2d(x, A, stride=base.stride, padding=base.padding, dilation=base.dilation)  # (N, r, H', W')
        return F.conv2d(h, B) * self.scaling[name]  # (N, out, H', W')

    def delta_weight(self, name: str) -> Tensor:
        A, B = self._factors(name)
        # conv(conv(x, A), B) with a 1×1 B is conv(x, B·A): the kernels compose linearly.
        delta = B.flatten(1) @ A.flatten(1)  # (out, in·kh·kw)
        return (delta * self.scaling[name]).view(self.base_layer.weight.shape)

