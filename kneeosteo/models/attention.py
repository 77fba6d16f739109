"""The paper's attention module (AM): a small CNN with CBAM-style channel + spatial attention.

The paper lists four 3x3 conv layers (32, 32, 64, 64 filters) with ReLU and 2x2 max-pooling,
channel and spatial attention, and a 128-unit output; it is silent on the details below, so
each choice is written down with its reason:

* **Pooling after every conv** (224 -> 112 -> 56 -> 28 -> 14), as the spec reads. It keeps the
  module cheap next to the backbone and gives a 14x14 spatial map, fine enough to overlay on a
  radiograph.
* **Channel attention before spatial attention**, the order CBAM (Woo et al., 2018) found best;
  the spatial map is then computed on already re-weighted channels.
* **Max-pool before ReLU** inside each block. ReLU is monotone, so ``relu(maxpool(x))`` equals
  ``maxpool(relu(x))`` exactly (outputs and gradients), but the ReLU and its backward then touch
  a quarter of the elements, so a training step of AM + head runs faster (measured by
  ``benchmarks/bench_am_step.py``: ``docs/results/benchmarks/am_step.md``). Checkpoints are unaffected (the parameter names are the same).
* **Conv bias on** (PyTorch and Keras default): there is no batch norm that would cancel it.
* **Global average pooling** before the 64 -> 128 Linear + ReLU. Flattening 64x14x14 would add
  1.6M parameters on a small data set and tie the module to one input size.
* **Reduction 16** in the channel MLP (CBAM's default), i.e. 64 -> 4 -> 64, with MLP biases as in
  the CBAM reference code. **7x7 spatial conv**, padding 3, also CBAM's default.
* Default PyTorch initialisation (the paper does not say; nothing here is pretrained).

The attention maps of the last forward pass are kept on the module for explanation
(``last_channel_weights`` (B, C) and ``last_spatial_map`` (B, 1, h, w)). They are **detached
float32 copies**: keeping the autograd graph alive between steps would leak memory during
training. Explanation code that needs gradients through the maps asks for them with
``forward(x, return_maps=True)``, which returns the live (non-detached) tensors.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["ChannelAttention", "SpatialAttention", "AttentionModule"]


class ChannelAttention(nn.Module):
    """CBAM channel attention: a shared MLP over avg- and max-pooled descriptors, summed, sigmoid.

    ``forward`` returns the re-weighted input; ``attention_map`` returns the (B, C, 1, 1)
    weights alone so a caller can both apply and record them. 1x1 convs are used for the MLP so
    the (B, C, 1, 1) layout (and channels_last) is kept without reshapes.
    """

    def __init__(self, channels: int, reduction: int = 16):
        super().__init__()
        if channels < 1 or reduction < 1:
            raise ValueError(f"channels and reduction must be >= 1, got {channels}, {reduction}")
        hidden = max(channels // reduction, 1)
        self.channels = channels
        self.reduction = reduction
        self.mlp = nn.Sequential(
            nn.Conv2d(channels, hidden, kernel_size=1, bias=True),
            nn.ReLU(),
            nn.Conv2d(hidden, channels, kernel_size=1, bias=True),
        )

    def attention_map(self, x: torch.Tensor) -> torch.Tensor:
        avg = F.adaptive_avg_pool2d(x, 1)
        mx = F.adaptive_max_pool2d(x, 1)
        return torch.sigmoid(self.mlp(avg) + self.mlp(mx))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.attention_map(x)


class SpatialAttention(nn.Module):
    """CBAM spatial attention: channel-wise mean and max maps -> k x k conv -> sigmoid.

    ``attention_map`` returns the (B, 1, H, W) map; ``forward`` applies it.
    """

    def __init__(self, kernel_size: int = 7):
        super().__init__()
        if kernel_size < 1 or kernel_size % 2 == 0:
            raise ValueError(f"kernel_size must be odd so the map keeps its size, got {kernel_size}")
        self.kernel_size = kernel_size
        self.conv = nn.Conv2d(2, 1, kernel_size=kernel_size, padding=kernel_size // 2, bias=True)

    def attention_map(self, x: torch.Tensor) -> torch.Tensor:
        mean = x.mean(dim=1, keepdim=True)
        mx = x.amax(dim=1, keepdim=True)
        return torch.sigmoid(self.conv(torch.cat([mean, mx], dim=1)))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * self.attention_map(x)


class AttentionModule(nn.Module):
    """The paper's AM: conv stack -> channel attention -> spatial attention -> GAP -> Linear+ReLU.

    Input: normalised images (B, in_channels, H, W); 224x224 gives 14x14 attention maps.
    Output: (B, out_features) non-negative features (final ReLU, as the paper's dense layer).
    See the module docstring for the choices the paper leaves open.
    """

    last_channel_weights: torch.Tensor | None
    last_spatial_map: torch.Tensor | None

    def __init__(
        self,
        in_channels: int = 3,
        out_features: int = 128,
        conv_channels: Sequence[int] = (32, 32, 64, 64),
        reduction: int = 16,
        spatial_kernel: int = 7,
        store_maps: bool = True,
    ):
        super().__init__()
        if not conv_channels:
            raise ValueError("conv_channels must name at least one conv layer")
        self.in_channels = in_channels
        self.out_features = out_features
        self.conv_channels = tuple(int(c) for c in conv_channels)
        self.reduction = reduction
        self.spatial_kernel = spatial_kernel
        self.store_maps = store_maps

        layers: list[nn.Module] = []
        prev = in_channels
        for ch in self.conv_channels:
            layers += [  # pool before ReLU: the same values, less work (see the module docstring)
                nn.Conv2d(prev, ch, kernel_size=3, padding=1, bias=True),
                nn.MaxPool2d(kernel_size=2, stride=2),
                nn.ReLU(),
            ]
            prev = ch
        self.features = nn.Sequential(*layers)
        self.channel_attention = ChannelAttention(prev, reduction)
        self.spatial_attention = SpatialAttention(spatial_kernel)
        self.fc = nn.Linear(prev, out_features)
        self.last_channel_weights = None
        self.last_spatial_map = None

    def config(self) -> dict:
        """Constructor arguments, for rebuilding the module exactly from a checkpoint."""
        return {
            "in_channels": self.in_channels,
            "out_features": self.out_features,
            "conv_channels": list(self.conv_channels),
            "reduction": self.reduction,
            "spatial_kernel": self.spatial_kernel,
        }

    def forward(self, x: torch.Tensor, return_maps: bool = False):
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"AttentionModule expects (B, {self.in_channels}, H, W) images, got {tuple(x.shape)}")
        h = self.features(x)
        channel = self.channel_attention.attention_map(h)  # (B, C, 1, 1)
        h = h * channel
        spatial = self.spatial_attention.attention_map(h)  # (B, 1, h, w)
        h = h * spatial
        out = F.relu(self.fc(torch.flatten(F.adaptive_avg_pool2d(h, 1), 1)))
        channel = channel.flatten(1)
        if self.store_maps:
            self.last_channel_weights = channel.detach().float()
            self.last_spatial_map = spatial.detach().float()
        if return_maps:
            return out, {"channel": channel, "spatial": spatial}
        return out
