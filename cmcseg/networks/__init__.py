"""Networks: the encoder registry and the Cross Modality Collaboration (CMC) network."""
from cmcseg.networks.cmc import (
    CMCNetwork,
    CMCOutput,
    build_cmc_network,
    split_modalities,
)
from cmcseg.networks.cmc_fusion import ChannelAttention, UnifiedFusion
from cmcseg.networks.encoders import (
    ENCODERS,
    ModalityEncoder,
    WeightsMismatchError,
    build_encoder,
    register_encoder,
)
from cmcseg.networks.sammed3d import SAMMed3DEncoder  # registers "sammed3d"
from cmcseg.networks.universal import UniversalEncoder  # registers "universal"

__all__ = [
    "CMCNetwork", "CMCOutput", "build_cmc_network",
    "split_modalities", "ENCODERS", "ModalityEncoder", "WeightsMismatchError", "build_encoder",
    "register_encoder", "ChannelAttention", "UnifiedFusion", "UniversalEncoder",
    "SAMMed3DEncoder",
]
