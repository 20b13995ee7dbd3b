"""CMC's bottleneck: channel attention per modality, then the unified fusion layer.

For M modality bottlenecks ``a_1..a_M`` (each ``(B, C, *spatial)``, after channel attention):

    h    = LeakyReLU(InstanceNorm(Conv_k([a_1; ...; a_M])))      the fused map, C channels
    g_m  = sigmoid(Conv_1x1,m([a_m; h]))                          modality m's gate
    b_m' = a_m + g_m * h                                          what modality m's decoder sees

Each modality decides per voxel and channel how much of the shared map it takes, from its own
features and the fused map; a modality whose gate closes keeps its own features unchanged.
"""
from __future__ import annotations

from collections.abc import Sequence

import torch
from torch import Tensor, nn


class ChannelAttention(nn.Module):
    """Squeeze-and-excitation channel attention (MONAI ``ChannelSELayer``) on one modality's bottleneck."""

    #: squeeze ratio (hidden units = channels // reduction, at least 1)
    reduction: int = 4

    def __init__(self, spatial_dims: int, channels: int):
        super().__init__()
        from monai.networks.blocks import ChannelSELayer  # MONAI loads all its modules: only when built
        self.se = ChannelSELayer(spatial_dims, channels, r=max(1, min(self.reduction, channels)))

    def forward(self, x: Tensor) -> Tensor:
        return self.se(x)


class UnifiedFusion(nn.Module):
    """The unified fusion layer: concatenated bottlenecks -> conv-norm-act -> per-modality sigmoid gate.

    See the module docstring for the formula. Input and output: a list of M tensors of equal shape.
    """

    #: kernel of the conv-norm-act on the concatenated bottlenecks
    kernel_size: int = 3
    #: LeakyReLU slope, as nnU-Net's default nonlinearity
    negative_slope: float = 0.01

    def __init__(self, spatial_dims: int, channels: int, n_modalities: int):
        super().__init__()
        self.n_modalities = n_modalities
        from monai.networks.blocks import Convolution  # MONAI loads all its modules: only when built
        self.mix = Convolution(spatial_dims, n_modalities * channels, channels, kernel_size=self.kernel_size,
                               act=("leakyrelu", {"negative_slope": self.negative_slope, "inplace": True}),
                               norm=("instance", {"affine": True}))
        self.gates = nn.ModuleList(
            Convolution(spatial_dims, 2 * channels, channels, kernel_size=1, conv_only=True)
            for _ in range(n_modalities))

    def forward(self, features: Sequence[Tensor]) -> list[Tensor]:
        fused = self.mix(torch.cat(list(features), dim=1))
        return [a + torch.sigmoid(gate(torch.cat((a, fused), dim=1))) * fused
                for a, gate in zip(features, self.gates)]
