"""Reading one raw case and bringing it into its reference space.

Shared by the fingerprint (planning) and the preprocessor, so that both see exactly the
same aligned voxels.
"""
from __future__ import annotations

from collections import Counter
from collections.abc import Mapping
from pathlib import Path

import numpy as np
import SimpleITK as sitk

from cmcseg.dataset import Case, Dataset
from cmcseg.errors import CmcsegError
from cmcseg.image_io import read_image, read_image_header
from cmcseg.preprocessing.alignment import AlignedCase, GridGeometry, align_case, modality_relation


def read_case_images(case: Case) -> dict[int, sitk.Image]:
    """All channel images of a case, keyed by channel index (ImageReadError names the file and case)."""
    return {ch: read_image(path, case=case.case_id) for ch, path in case.images.items()}


def read_case_label(case: Case) -> sitk.Image | None:
    return read_image(case.label, case=case.case_id) if case.label is not None else None


def label_grid_channel(case: Case, preferred: int | None = None) -> int | None:
    """The channel whose grid the case's label lies on (headers only), or None for an unlabeled case.

    When several channels share the label's grid (co-registered data), ``preferred`` wins if it
    is among them, else the lowest channel. A label on no channel's grid is an error.
    """
    if case.label is None:
        return None
    label = _header_geometry(case.label, case.case_id)
    matches = []
    for ch, path in case.images.items():
        rel = modality_relation(label, _header_geometry(path, case.case_id))
        if rel.kind in ("same_grid", "same_space"):
            matches.append((rel.kind != "same_grid", rel.centre_offset_mm, ch))
    if not matches:
        raise CmcsegError(
            f"case {case.case_id}: the label {case.label} lies on no modality's grid or physical extent. "
            "Fix: the label must share the geometry (size, spacing, origin, direction) of one of the case's images."
        )
    exact = [ch for same_space, _, ch in sorted(matches) if not same_space]
    if preferred is not None and preferred in exact:
        return preferred
    return sorted(matches)[0][2]


def _header_geometry(path: Path, case_id: str) -> GridGeometry:
    """The geometry in a file's header, as 3D, without reading its pixels."""
    return GridGeometry.of(read_image_header(path, case=case_id)).as_3d()


def choose_reference_channel(dataset: Dataset, override: str | None = None) -> int:
    """The reference modality: the user's override, else the channel the labels lie on, else the
    dataset's declared reference, else channel 0."""
    if override is not None:
        return dataset.channel_index(override)
    declared = dataset.channel_index(dataset.reference_modality) if dataset.reference_modality else None
    if dataset.unpaired:
        return declared if declared is not None else 0
    votes = Counter(ch for c in dataset.labeled_cases if (ch := label_grid_channel(c, declared)) is not None)
    if votes:
        best = max(votes.values())
        winners = sorted(ch for ch, v in votes.items() if v == best)
        return declared if declared is not None and declared in winners else winners[0]
    return declared if declared is not None else 0


def load_case_in_reference_space(
    dataset: Dataset,
    case: Case,
    reference_channel: int,
    transforms: Mapping[int, sitk.Transform] | None = None,
    label_interpolation: str = "nearest",
) -> AlignedCase:
    """Read a case and resample it into the reference space of ``reference_channel``.

    Paired datasets: every channel goes onto the reference channel's grid; the label moves
    with the channel it lies on. Unpaired datasets: the case's one channel is its own
    reference; the other modalities' channels are zero with an all-zero field-of-view mask.
    """
    images = read_case_images(case)
    label = read_case_label(case)
    if dataset.unpaired:
        (ch, image), = images.items()
        aligned = align_case({ch: image}, ch, label, ch, None, label_interpolation)
        return _pad_absent_modalities(aligned, dataset)
    owner = label_grid_channel(case, reference_channel)
    return align_case(images, reference_channel, label, owner, transforms, label_interpolation)


def _pad_absent_modalities(aligned: AlignedCase, dataset: Dataset) -> AlignedCase:
    (present,) = aligned.channels_per_modality
    n_present = aligned.channels_per_modality[present]
    spatial = aligned.data.shape[1:]
    data, fov, comps = [], [], {}
    for ch in sorted(dataset.channel_names):
        if ch == present:
            data.append(aligned.data)
            fov.append(aligned.fov[0])
            comps[ch] = n_present
        else:
            data.append(np.zeros((1, *spatial), np.float32))
            fov.append(np.zeros(spatial, np.uint8))
            comps[ch] = 1
    return AlignedCase(np.concatenate(data), np.stack(fov), aligned.seg, aligned.reference, comps, aligned.relations)
