"""Any2Seg (2D): segmentation from any subset of modalities.

- :mod:`~cmcseg.any2seg.backbone`: the shared MiT (SegFormer) backbone, local weights only.
- :mod:`~cmcseg.any2seg.fusion`: modality-agnostic feature fusion (MFF) for any number of modalities.
- :mod:`~cmcseg.any2seg.model`: :class:`Any2SegModel` (backbone + MFF per stage + all-MLP decoder).
- :mod:`~cmcseg.any2seg.teachers`: frozen language teachers (MiniLM offline default, LanguageBind).
- :mod:`~cmcseg.any2seg.distillation`: LSCD losses and the EMA full-modality teacher.
"""
from cmcseg.any2seg.backbone import (
    MIT_VARIANTS,
    MiTBackbone,
    build_mit_backbone,
    convert_mit_state_dict,
    load_mit_weights,
    match_channels,
    mit_config,
)
from cmcseg.any2seg.distillation import EMATeacherModel, LSCDLoss, LSCDTerms, token_affinity
from cmcseg.any2seg.fusion import ModalityAgnosticFusion, modality_agnostic_feature_fusion
from cmcseg.any2seg.model import (
    Any2SegModel,
    Any2SegOutput,
    Any2SegProbabilities,
    SubsetProbabilities,
    fov_presence,
    modality_images,
    non_empty_subsets,
    normalize_present,
    sample_modality_subsets,
    stack_modalities,
)
from cmcseg.any2seg.teachers import (
    DEFAULT_TEMPLATE,
    MEDICAL_TEMPLATE,
    LanguageBindTeacher,
    MiniLMTeacher,
    Teacher,
    build_teacher,
)

__all__ = [
    "MIT_VARIANTS", "MiTBackbone", "build_mit_backbone", "convert_mit_state_dict", "load_mit_weights",
    "match_channels", "mit_config", "EMATeacherModel", "LSCDLoss", "LSCDTerms", "token_affinity",
    "ModalityAgnosticFusion", "modality_agnostic_feature_fusion", "Any2SegModel", "Any2SegOutput",
    "Any2SegProbabilities",
    "SubsetProbabilities",
    "normalize_present", "sample_modality_subsets", "non_empty_subsets", "modality_images",
    "fov_presence", "stack_modalities", "DEFAULT_TEMPLATE", "MEDICAL_TEMPLATE",
    "LanguageBindTeacher", "MiniLMTeacher", "Teacher", "build_teacher",
]
