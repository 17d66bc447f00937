"""Make a CPU forward pass give each image the same features whatever batch or thread count runs it.

Why this exists: PyTorch sends a float32 1x1 convolution on the CPU to one of two kernels. With
one thread and a batch under 16 it uses its own im2col + GEMM ("THNN", faster single-threaded);
otherwise oneDNN.  The two sum in different orders, so the same image's features differ by ~1e-6
depending on how many images share its batch and how many threads the process has.  That is
harmless for a score, but SPADE picks its gallery by the K nearest global vectors: a near-tie at
the K-th neighbour then flips, a different gallery is matched, and the map of that image changes
by percents.  An in-process model (2 threads, batch 16) and a Ray actor (1 thread, the tail of a
batch) would disagree on exactly such images.

oneDNN's forward convolutions split work over images, output channels and pixels, never over the
summed input channels, so their result per image does not depend on batch or threads (measured:
one result for threads 1-8 x batch 1-32 on lite0).  Pinning every 1x1 convolution to oneDNN makes
the whole backbone batch- and thread-invariant at a cost of ~15% only for 1-thread batch-1 runs.
CUDA and non-float32 inputs keep PyTorch's normal dispatch.
"""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["OneDnnConv2d", "pin_onednn_convolutions"]


class OneDnnConv2d(nn.Conv2d):
    """An ``nn.Conv2d`` that always runs oneDNN for float32 CPU inputs (same weights, same output)."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.device.type == "cpu" and x.dtype == torch.float32 and self.padding_mode == "zeros" \
                and torch.backends.mkldnn.is_available():
            return torch.mkldnn_convolution(
                x, self.weight, self.bias, self.padding, self.stride, self.dilation, self.groups
            )
        return super().forward(x)


def pin_onednn_convolutions(module: nn.Module) -> int:
    """Turn every plain 1x1 ``nn.Conv2d`` inside ``module`` into a :class:`OneDnnConv2d`, in place.

    Only exact ``nn.Conv2d`` instances are changed (subclasses such as timm's ``Conv2dSame`` pad in
    their own ``forward`` and are never 1x1 in our backbones); the others already reach oneDNN.
    Returns how many were changed.
    """
    changed = 0
    for child in module.modules():
        if type(child) is nn.Conv2d and child.kernel_size == (1, 1):
            child.__class__ = OneDnnConv2d  # same attributes and parameters, another forward
            changed += 1
    return changed
