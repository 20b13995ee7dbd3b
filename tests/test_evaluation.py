"""Evaluation: agreement with nnU-Net's Dice, known geometry, clear errors, and the `cmcseg evaluate` command."""
from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import SimpleITK as sitk

from cmcseg.cli.main import main
from cmcseg.evaluation import EvaluationError, evaluate_case, evaluate_folders
from cmcseg.image_io import array_to_image, write_image

SPACING = (1.0, 1.0, 3.0)  # SimpleITK order (x, y, z): 3 mm along the array's first axis


def _write(folder: Path, case: str, array: np.ndarray, spacing=SPACING, origin=(0.0, 0.0, 0.0)) -> Path:
    path = folder / f"{case}.nii.gz"
    write_image(array_to_image(array.astype(np.uint8), spacing, origin), path)
    return path


def _box(shape=(12, 16, 16), **boxes: tuple[slice, ...]) -> np.ndarray:
    """A label map with label ``int(k[1:])`` filling each box given as ``l1=(slice, slice, slice)``."""
    arr = np.zeros(shape, dtype=np.uint8)
    for key, box in boxes.items():
        arr[box] = int(key[1:])
    return arr


def _cases() -> dict[str, tuple[np.ndarray, np.ndarray]]:
    """Reference and prediction per case: partial overlaps, a class empty in both, one empty reference only."""
    s = np.s_
    return {
        "case_a": (_box(l1=s[2:8, 2:10, 2:10], l2=s[8:11, 10:14, 10:14]),
                   _box(l1=s[3:9, 2:10, 3:11], l2=s[8:11, 11:15, 10:14])),
        "case_b": (_box(l1=s[1:6, 4:12, 4:12]),                          # class 2 empty in both, 3 absent
                   _box(l1=s[1:6, 5:12, 4:12])),
        "case_c": (_box(l1=s[4:10, 1:6, 1:6], l2=s[1:3, 8:12, 8:12]),    # 2 missed; 3 predicted, not in reference
                   _box(l1=s[4:10, 1:6, 2:7], l3=s[8:10, 10:14, 10:14])),
    }


@pytest.fixture
def folders(tmp_path: Path) -> tuple[Path, Path]:
    ref, pred = tmp_path / "ref", tmp_path / "pred"
    for case, (r, p) in _cases().items():
        _write(ref, case, r)
        _write(pred, case, p)
    return ref, pred


def test_dice_matches_nnunet(folders, tmp_path: Path):
    from nnunetv2.evaluation.evaluate_predictions import compute_metrics_on_folder
    from nnunetv2.imageio.simpleitk_reader_writer import SimpleITKIO

    ref, pred = folders
    labels = [1, 2, 3]
    theirs = compute_metrics_on_folder(str(ref), str(pred), None, SimpleITKIO(), ".nii.gz", labels, num_processes=1)
    ours = evaluate_folders(ref, pred, labels=labels)
    table = ours.per_case.set_index(["case", "label"])
    for entry in theirs["metric_per_case"]:
        case = Path(entry["prediction_file"]).name.removesuffix(".nii.gz")
        for label in labels:
            for metric in ("Dice", "IoU", "TP", "FP", "FN", "TN", "n_pred", "n_ref"):
                expected, got = float(entry["metrics"][label][metric]), float(table.loc[(case, label), metric])
                assert math.isnan(expected) == math.isnan(got), (case, label, metric)
                if not math.isnan(expected):
                    assert got == pytest.approx(expected, abs=1e-6), (case, label, metric)
    for label in labels:
        for metric in ("Dice", "IoU", "TP", "n_ref"):
            assert ours.summary["mean"][str(label)][metric] == pytest.approx(theirs["mean"][label][metric], abs=1e-6)
    assert ours.summary["foreground_mean"]["Dice"] == pytest.approx(theirs["foreground_mean"]["Dice"], abs=1e-6)
    # the cases the brief singles out, explicitly
    assert math.isnan(table.loc[("case_b", 2), "Dice"])
    assert table.loc[("case_c", 3), "Dice"] == 0.0
    assert table.loc[("case_c", 3), "HD95"] == math.inf
    assert math.isnan(table.loc[("case_b", 2), "HD95"])
    two = ours.summary["mean"]["2"]
    assert (two["n_cases"], two["n_both_empty"], two["n_one_side_empty"]) == (3, 1, 1)  # case_c: missed
    three = ours.summary["mean"]["3"]
    assert (three["n_both_empty"], three["n_one_side_empty"]) == (2, 1)
    assert three["HD95"] is None  # no finite distance: the mean is undefined, not inf


def test_labels_default_to_the_values_found(folders):
    ref, pred = folders
    found = evaluate_folders(ref, pred)
    given = evaluate_folders(ref, pred, labels=[1, 2, 3])
    assert found.labels == [1, 2, 3]
    pd.testing.assert_frame_equal(found.per_case, given.per_case)


def test_shifted_cube_gives_known_dice_and_hd95(tmp_path: Path):
    n, shift = 10, 2
    ref = np.zeros((16, 14, 14), np.uint8)
    pred = np.zeros_like(ref)
    ref[2:2 + n, 2:2 + n, 2:2 + n] = 1
    pred[2 + shift:2 + shift + n, 2:2 + n, 2:2 + n] = 1  # shifted along the 3 mm axis
    rows = evaluate_case(_write(tmp_path / "r", "cube", ref), _write(tmp_path / "p", "cube", pred), labels=[1])
    assert len(rows) == 1
    row = rows[0]
    assert row["Dice"] == pytest.approx((n - shift) / n, abs=1e-6)
    assert row["IoU"] == pytest.approx((n - shift) / (n + shift), abs=1e-6)
    assert row["HD95"] == pytest.approx(shift * 3.0, abs=1e-4)
    assert 0 < row["ASD"] < shift * 3.0
    assert (row["TP"], row["FP"], row["FN"]) == (n * n * (n - shift), n * n * shift, n * n * shift)


def test_grid_mismatch_names_the_case(tmp_path: Path):
    arr = _box(l1=np.s_[2:6, 2:6, 2:6])
    _write(tmp_path / "ref", "good", arr)
    _write(tmp_path / "pred", "good", arr)
    _write(tmp_path / "ref", "shifted", arr)
    _write(tmp_path / "pred", "shifted", arr, origin=(0.0, 0.0, 5.0))
    with pytest.raises(EvaluationError, match=r"case shifted: .*origin"):
        evaluate_folders(tmp_path / "ref", tmp_path / "pred")


def test_missing_prediction_names_the_case_and_chill_skips_it(tmp_path: Path, caplog):
    arr = _box(l1=np.s_[2:6, 2:6, 2:6])
    for case in ("c1", "c2"):
        _write(tmp_path / "ref", case, arr)
    _write(tmp_path / "pred", "c1", arr)
    _write(tmp_path / "pred", "stray", arr)
    (tmp_path / "pred" / "c1.npz").write_bytes(b"")  # not an image: ignored
    with pytest.raises(EvaluationError, match=r"no prediction .*: c2\."):
        evaluate_folders(tmp_path / "ref", tmp_path / "pred")
    result = evaluate_folders(tmp_path / "ref", tmp_path / "pred", allow_missing=True)
    assert list(result.per_case["case"]) == ["c1"] and result.per_case["Dice"].iloc[0] == 1.0
    assert "stray" in caplog.text and "c2" in caplog.text


def test_cli_writes_metrics_and_summary(folders, tmp_path: Path, capsys):
    ref, pred = folders
    out = tmp_path / "out"
    code = main(["evaluate", "-r", str(ref), "-p", str(pred), "-o", str(out), "--labels", "1", "2", "3"])
    assert code == 0
    printed = capsys.readouterr().out
    assert "Dice" in printed and "foreground mean" in printed and "metrics.csv" in printed
    frame = pd.read_csv(out / "metrics.csv")
    assert len(frame) == 9 and {"case", "label", "Dice", "IoU", "HD95", "ASD", "TP", "FP", "FN"} <= set(frame)
    summary = json.loads((out / "summary.json").read_text())  # strict JSON: no NaN/Infinity tokens
    assert set(summary["mean"]) == {"1", "2", "3"} and "Dice" in summary["foreground_mean"]
    assert summary["mean"]["1"]["Dice"] == pytest.approx(frame[frame.label == 1].Dice.mean())


def test_cli_missing_prediction_is_a_clear_error(tmp_path: Path, capsys):
    arr = _box(l1=np.s_[2:6, 2:6, 2:6])
    _write(tmp_path / "ref", "lonely", arr)
    _write(tmp_path / "pred", "other", arr)
    code = main(["evaluate", "-r", str(tmp_path / "ref"), "-p", str(tmp_path / "pred")])
    err = capsys.readouterr().err
    assert code == 2 and "lonely" in err and "Traceback" not in err


def test_cli_with_a_dataset_uses_its_labels_and_labelsTr(tiny_dataset: Path, tmp_path: Path, capsys):
    pred = tmp_path / "pred"
    for label in sorted((tiny_dataset / "labelsTr").glob("*.nii.gz")):
        write_image(sitk.ReadImage(str(label)), pred / label.name)
    code = main(["evaluate", "-d", tiny_dataset.name, "--raw", str(tiny_dataset.parent), "-p", str(pred), "-np", "2"])
    assert code == 0
    assert "blob" in capsys.readouterr().out
    summary = json.loads((pred / "summary.json").read_text())
    assert summary["labels"] == {"1": "blob"} and summary["mean"]["1"]["Dice"] == 1.0
    assert summary["mean"]["1"]["HD95"] == 0.0 and summary["num_cases"] == 2


def test_json_safe_gives_strict_json_values() -> None:
    """One sanitiser for every JSON the tools write: numpy to Python, NaN and inf to null, recursively."""
    from cmcseg.image_io import json_safe

    value = {"a": np.float32(0.5), "b": [math.nan, np.int64(3), (math.inf, -math.inf)], "c": np.array([1.0, np.nan])}
    assert json_safe(value) == {"a": 0.5, "b": [None, 3, [None, None]], "c": [1.0, None]}
    assert json.loads(json.dumps(json_safe(value), allow_nan=False)) == json_safe(value)
