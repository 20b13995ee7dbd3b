"""cmcseg: self-configuring multimodal medical image segmentation.

Built for the data clinics actually have: misaligned sequences, few labels and missing
modalities. See DESIGN.md (shared) and README.md.
"""
import logging

__version__ = "0.1.0"

logging.getLogger(__name__).addHandler(logging.NullHandler())
