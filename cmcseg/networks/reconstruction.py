"""The network of self-supervised pretraining (``cmcseg pretrain``): a registered encoder and a decoder that
reconstructs the image channels.

The encoder is built exactly as the default CMC network builds its one encoder over all modalities (the image
channels, then one FOV mask per modality), so its state dict is what ``cmcseg train --encoder-weights`` loads.
The decoder is the encoder's own (:meth:`ModalityEncoder.build_decoder`) with one output per image channel; it is
thrown away after pretraining.
"""
from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from torch import Tensor, nn

from cmcseg.networks.encoders import ModalityEncoder, build_encoder


class ReconstructionNetwork(nn.Module):
    """``encoder`` + a decoder with ``image_channels`` outputs: ``forward(x)`` gives the reconstructed image
    channels at full resolution."""

    def __init__(self, encoder: ModalityEncoder, image_channels: int):
        super().__init__()
        self.encoder = encoder
        self.decoder = encoder.build_decoder(image_channels, deep_supervision=False)

    def forward(self, x: Tensor) -> Tensor:
        out = self.decoder(self.encoder(x))
        return out[0] if isinstance(out, list) else out


def build_reconstruction_network(encoder: str, plan_config: Mapping[str, Any], image_channels: int,
                                 num_modalities: int, encoder_options: Mapping[str, Any] | None = None,
                                 weights: Path | str | None = None, unsafe_allow_pickle: bool = False
                                 ) -> ReconstructionNetwork:
    """The pretraining network for a plan configuration: the encoder ``encoder`` over ``image_channels`` image and
    ``num_modalities`` FOV channels, as the default CMC network's (``single_branch``), starting from ``weights``
    (a local file) if given."""
    module = build_encoder(encoder, plan_config, image_channels + num_modalities, weights,
                           fov_channels=num_modalities, unsafe_allow_pickle=unsafe_allow_pickle,
                           **dict(encoder_options or {}))
    return ReconstructionNetwork(module, image_channels)
