"""Alignment of misaligned modalities into the reference space: phantoms with truthful headers, and real data."""
from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import SimpleITK as sitk
from scipy.ndimage import binary_dilation, zoom

from cmcseg.dataset import Case
from cmcseg.image_io import write_image
from cmcseg.preprocessing.alignment import _index_to_physical, _physical_to_index, align_case, modality_relation
from cmcseg.preprocessing.case_loading import label_grid_channel

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"

REF_SIZE, REF_SPACING = (64, 64, 24), (1.0, 1.0, 2.0)  # x, y, z
MOV_SPACING = (1.5, 1.5, 2.5)
IDENTITY = np.eye(3)
STRUCTURE_CENTRE, STRUCTURE_RADII = (12.0, -6.0, 4.0), (14.0, 9.0, 10.0)  # mm, off-centre and asymmetric


def _euler_matrix(rx_deg: float, ry_deg: float, rz_deg: float) -> np.ndarray:
    tx = sitk.Euler3DTransform((0, 0, 0), *np.radians([rx_deg, ry_deg, rz_deg]), (0, 0, 0))
    return np.asarray(tx.GetMatrix()).reshape(3, 3)


def _grid(size, spacing, direction=IDENTITY, centre=(0.0, 0.0, 0.0)) -> sitk.Image:
    """An empty float32 image whose extent is centred on ``centre`` (mm)."""
    img = sitk.Image([int(s) for s in size], sitk.sitkFloat32)
    img.SetSpacing(tuple(float(s) for s in spacing))
    d = np.asarray(direction, float).reshape(3, 3)
    img.SetDirection(tuple(d.ravel()))
    img.SetOrigin(tuple(np.asarray(centre) - d @ ((np.asarray(size) - 1) / 2 * np.asarray(spacing))))
    return img


def _physical_points(img: sitk.Image) -> np.ndarray:
    """(z, y, x, 3) physical coordinates of every voxel centre."""
    size = img.GetSize()
    idx = np.stack(np.meshgrid(*[np.arange(n) for n in size[::-1]], indexing="ij"), -1)[..., ::-1]
    return _index_to_physical(img, idx.reshape(-1, 3).astype(float)).reshape(*size[::-1], 3)


def _structure(p: np.ndarray) -> np.ndarray:
    return (((p - STRUCTURE_CENTRE) / STRUCTURE_RADII) ** 2).sum(-1) <= 1


def _render(grid: sitk.Image, body: float, inside: float, anatomy: sitk.Transform | None = None) -> sitk.Image:
    """The phantom seen on ``grid``: a body ellipsoid and the structure. ``anatomy`` maps grid points to scene
    points (a header that lies by that transform); None: the header tells the truth."""
    p = _physical_points(grid)
    if anatomy is not None:
        p = np.asarray([anatomy.TransformPoint(tuple(q)) for q in p.reshape(-1, 3)]).reshape(p.shape)
    in_body = (((p - (0, 0, 0)) / (30, 28, 22)) ** 2).sum(-1) <= 1
    arr = body * in_body + (inside - body) * _structure(p)
    out = sitk.GetImageFromArray(arr.astype(np.float32))
    out.CopyInformation(grid)
    return out


def _label(grid: sitk.Image, anatomy: sitk.Transform | None = None) -> sitk.Image:
    img = _render(grid, 0.0, 1.0, anatomy)
    return sitk.Cast(img > 0.5, sitk.sitkUInt8)


def _dice(a: np.ndarray, b: np.ndarray) -> float:
    return float(2 * (a & b).sum() / max(a.sum() + b.sum(), 1))


@pytest.fixture(scope="module")
def scene() -> dict:
    """Reference T1-like and a moving modality with a shifted origin, a rotated direction and its own spacing."""
    reference = _render(_grid(REF_SIZE, REF_SPACING), body=100.0, inside=300.0)
    direction = _euler_matrix(10.0, 0.0, 25.0)
    moving_grid = _grid((44, 44, 20), MOV_SPACING, direction, centre=(6.0, -4.0, 3.0))
    moving = _render(moving_grid, body=400.0, inside=1000.0)
    return {"reference": reference, "moving": moving}


def test_misaligned_modality_comes_back_aligned(scene):
    ref, mov = scene["reference"], scene["moving"]
    assert modality_relation(mov, ref).kind == "misaligned"
    aligned = align_case({0: ref, 1: mov}, reference_channel=0)
    assert aligned.data.shape == (2, *REF_SIZE[::-1]) and aligned.fov.shape == (2, *REF_SIZE[::-1])
    truth = sitk.GetArrayFromImage(ref) > 200
    after = (aligned.data[1] > 700) & (aligned.fov[1] > 0)
    assert _dice(truth, after) >= 0.95

    naive = zoom(sitk.GetArrayFromImage(mov), np.divide(REF_SIZE[::-1], mov.GetSize()[::-1]), order=1) > 700
    assert naive.shape == truth.shape
    assert _dice(truth, naive) < 0.65, "ignoring the headers must not look aligned"


def test_fov_mask_marks_the_moving_extent(scene):
    ref = scene["reference"]
    small = _render(_grid((20, 24, 10), (2.0, 2.0, 3.0), _euler_matrix(0, 5, 15), centre=(14, 8, 2)), 400.0, 1000.0)
    aligned = align_case({0: ref, 1: small}, reference_channel=0)
    fov, data = aligned.fov[1], aligned.data[1]
    idx = _physical_to_index(small, _physical_points(ref).reshape(-1, 3)).reshape(*REF_SIZE[::-1], 3)
    size = np.asarray(small.GetSize())
    margin = np.minimum(idx + 0.5, size - 0.5 - idx).min(-1)  # > 0 inside the extent, in voxels
    assert np.all(fov[margin > 0.01] == 1) and np.all(fov[margin < -0.01] == 0)
    assert 0.05 < fov.mean() < 0.6
    assert np.all(data[fov == 0] == 0)
    assert aligned.fov[0].all() and aligned.fov.dtype == np.uint8


def test_label_on_a_moving_grid_moves_with_its_modality(scene):
    ref = scene["reference"]
    # the moving header lies by a rigid transform: its anatomy sits 7 mm and 6 degrees away
    lie = sitk.Euler3DTransform((0, 0, 0), 0.0, np.radians(3), np.radians(6), (7.0, -3.0, 2.0))
    grid = _grid((44, 44, 20), MOV_SPACING, _euler_matrix(0, 0, 20), centre=(2, 1, 0))
    moving, label = _render(grid, 400.0, 1000.0, lie.GetInverse()), _label(grid, lie.GetInverse())
    truth = sitk.GetArrayFromImage(ref) > 200
    aligned = align_case({0: ref, 1: moving}, 0, label=label, label_channel=1, transforms={1: lie})
    assert _dice(truth, aligned.seg > 0) >= 0.9
    assert _dice(truth, aligned.data[1] > 700) >= 0.9
    as_if_reference = align_case({0: ref, 1: moving}, 0, label=label, label_channel=0, transforms={1: lie})
    assert _dice(truth, as_if_reference.seg > 0) < 0.75, "a label that ignores its modality's transform is off"


def test_label_grid_channel_finds_the_modality_the_label_lies_on(scene, tmp_path):
    paths = {0: tmp_path / "c_0000.nii.gz", 1: tmp_path / "c_0001.nii.gz"}
    write_image(scene["reference"], paths[0])
    write_image(scene["moving"], paths[1])
    write_image(sitk.Cast(scene["moving"] > 700, sitk.sitkUInt8), tmp_path / "c.nii.gz")
    assert label_grid_channel(Case("c", paths, tmp_path / "c.nii.gz"), preferred=0) == 1


# ---------------------------------------------------------------------- real data
def _shared(*parts: str) -> Path:
    path = SHARED_DATA.joinpath(*parts)
    if not path.exists():
        pytest.skip(f"real sample data not available at {path} (only on developer and CI machines)")
    return path


def _read(path: Path) -> sitk.Image:
    return sitk.ReadImage(str(path))


def _physical_centroid(grid: sitk.Image, weights: np.ndarray) -> np.ndarray:
    zz, yy, xx = np.indices(weights.shape)
    w = weights.astype(float)
    idx = np.array([(xx * w).sum(), (yy * w).sum(), (zz * w).sum()]) / w.sum()
    return _index_to_physical(grid, idx[None])[0]


def _gland_is_consistent(t2: sitk.Image, adc: sitk.Image, hbv: sitk.Image, gland: sitk.Image) -> bool:
    """ADC/HBV resampled onto T2W cover the gland, and HBV is bright on it and centred near it."""
    aligned = align_case({0: t2, 1: adc, 2: hbv}, 0, label=gland, label_channel=0)
    g = aligned.seg > 0
    if min(aligned.fov[1][g].mean(), aligned.fov[2][g].mean()) < 0.9:
        return False
    hbv_on_t2 = aligned.data[2]
    ring = binary_dilation(g, iterations=20) & ~g & (aligned.fov[2] > 0)
    bright = hbv_on_t2[g].mean() > 1.5 * hbv_on_t2[ring].mean()
    zz, yy, xx = np.nonzero(g)
    box = np.zeros_like(g)
    box[max(0, zz.min() - 3): zz.max() + 4, max(0, yy.min() - 40): yy.max() + 41,
        max(0, xx.min() - 40): xx.max() + 41] = True
    distance = np.linalg.norm(_physical_centroid(t2, np.where(box, hbv_on_t2, 0)) - _physical_centroid(t2, g))
    return bool(bright and distance < 10.0)


def _flip_axis_keeping_origin(img: sitk.Image, axis: int) -> sitk.Image:
    """The classic conversion bug: one axis's direction negated, the origin kept."""
    out = sitk.Image(img)
    d = np.asarray(out.GetDirection()).reshape(3, 3)
    d[:, axis] *= -1
    out.SetDirection(tuple(d.ravel()))
    return out


def _identity_direction(img: sitk.Image) -> sitk.Image:
    out = sitk.Image(img)
    out.SetDirection(tuple(np.eye(3).ravel()))
    return out


def test_prostatex_adc_hbv_land_on_the_t2w_gland():
    case = _shared("prostatex", "ProstateX-0000")
    native = case / "native"
    t2, adc, hbv = (_read(native / f"ProstateX-0000_{m}.nii.gz") for m in ("t2w", "adc", "hbv"))
    gland = _read(next((case / "labels/anatomical_delineations/whole_gland/AI/Bosma22b").glob("*.nii.gz")))
    assert modality_relation(adc, t2).kind == "misaligned" and adc.GetSize() != t2.GetSize()

    aligned = align_case({0: t2, 1: adc, 2: hbv}, 0, label=gland, label_channel=0)
    assert aligned.data.shape == (3, 19, 384, 384) and aligned.fov.shape == (3, 19, 384, 384)
    assert aligned.reference.GetSpacing() == t2.GetSpacing() and aligned.reference.GetOrigin() == t2.GetOrigin()
    assert aligned.seg.shape == (19, 384, 384) and aligned.seg.max() == 1
    assert _gland_is_consistent(t2, adc, hbv, gland)

    assert not _gland_is_consistent(t2, _flip_axis_keeping_origin(adc, 0), _flip_axis_keeping_origin(hbv, 0), gland)
    assert not _gland_is_consistent(t2, _identity_direction(adc), _identity_direction(hbv), gland), \
        "ignoring the oblique direction matrix must be caught"


def test_spinalcord_contrasts_with_their_own_orientation():
    anat = _shared("spinalcord", "sub-unf02", "anat")
    images = {i: _read(anat / f"sub-unf02_{m}.nii.gz") for i, m in enumerate(("T1w", "T2w", "T2star"))}
    assert len({tuple(np.round(im.GetDirection(), 3)) for im in images.values()}) == 3, "three orientations"
    for ch in (0, 2):
        rel = modality_relation(images[ch], images[1])
        assert rel.kind in ("misaligned", "same_space")
        assert 0.0 < rel.overlap_fraction <= 1.0 and 0.0 <= rel.centre_offset_mm < 200.0
    aligned = align_case(images, reference_channel=1)
    assert aligned.data.shape == (3, *images[1].GetSize()[::-1])
    assert aligned.fov[1].all()
    for ch in (0, 2):  # the mask covers what the relation says the modality covers
        assert abs(aligned.fov[ch].mean() - aligned.relations[ch].overlap_fraction) < 0.1
        assert np.all(aligned.data[ch][aligned.fov[ch] == 0] == 0)
