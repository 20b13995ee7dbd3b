"""MyoPS 2020 (myocardial pathology segmentation, bSSFP/C0, LGE/DE, T2) -> raw dataset ``MYOPS``.

Official naming (zmiclab.github.io/zxh/0/myops20; release tree as documented by
openmedlab/Awesome-Medical-Dataset and used by published loaders, e.g.
``MyoPS2020_Raw/train25/myops_training_{i + 100}_DE.nii.gz`` and
``train25_myops_gd/myops_training_{i + 100}_gd.nii.gz``)::

    train25/myops_training_{101..125}_{C0,DE,T2}.nii.gz
    train25_myops_gd/myops_training_{101..125}_gd.nii.gz
    test20/myops_test_{201..220}_{C0,DE,T2}.nii.gz
    MyoPS2020_EvaluateByYourself/test_data_gd/myops_test_2NN_gdencrypt.nii.gz   (encrypted)

The per-case folder copy kept in Tengjia-Kang/MyoPS (``datasets/Competition_Dataset``; the
copy in ``shared/data/myops_dev``) names files by case folder and uses ``LGE`` for ``DE``::

    labeled/Case{3026..3045}/Case30NN_{C0,LGE,T2,gd}.nii.gz      (official test images 201-220)
    unlabeled/Case{4001..4025}/Case40NN_{C0,LGE,T2}.nii.gz       (no labels)

Label values: 200 LV normal myocardium, 500 LV blood pool, 600 RV blood pool,
1220 LV myocardial edema, 2221 LV myocardial scar (organisers' description; the same in both).

What this converter does: the three sequences of a case were released on one grid, so the
one ``_gd`` label serves whichever sequence is the reference (LGE). ``test20`` cases go to
imagesTs without labels (the official held-out test set; the encrypted labels are ignored).
Training cases without a ``_gd`` file are unlabeled training cases; every ``CaseNNNN`` case
is a training case (its top folder, e.g. ``labeled``, is recorded as its official split) and
keeps its folder name as case id. Files are found anywhere under the source by name; each
naming keeps its own sequence token (``myops_*_DE``, ``CaseNNNN_LGE``).
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from cmcseg.preprocessing.converters.base import LabelEncoding
from cmcseg.preprocessing.converters.cardiac import NamedSequenceConverter

OFFICIAL = LabelEncoding("official", {
    0: "background", 200: "myocardium", 500: "LV", 600: "RV", 1220: "edema", 2221: "scar",
})

_OFFICIAL_CASE = r"myops_(?:training|test)_\d+"
_FOLDER_CASE = r"Case\d+"
_FOLDER_TOKENS = {"bSSFP": "C0", "LGE": "LGE", "T2": "T2"}


@dataclass(frozen=True)
class MyopsConverter(NamedSequenceConverter):
    """MyoPS 2020 in its release tree (train25, train25_myops_gd, test20) or as CaseNNNN folders."""

    fmt = "myops"
    dataset = "MYOPS"
    layout = ("train25/myops_training_1NN_{C0,DE,T2}.nii.gz, train25_myops_gd/myops_training_1NN_gd.nii.gz, "
              "test20/myops_test_2NN_{C0,DE,T2}.nii.gz (official), or "
              "CaseNNNN/CaseNNNN_{C0,LGE,T2}.nii.gz with optional CaseNNNN_gd.nii.gz (per-case folders)")
    # LGE is "DE" in official names and "LGE" in CaseNNNN names; the conditional keeps them apart.
    image_pattern = re.compile(
        rf"^(?P<case>(?P<official>{_OFFICIAL_CASE})|{_FOLDER_CASE})_(?P<seq>C0|T2|(?(official)DE|LGE))\.nii(?:\.gz)?$"
    )
    label_pattern = re.compile(rf"^(?P<case>{_OFFICIAL_CASE}|{_FOLDER_CASE})_gd\.nii(?:\.gz)?$")
    ignored_pattern = re.compile(r"^myops_test_\d+_gdencrypt\.nii(?:\.gz)?$")
    ignored_what = "encrypted test label (*_gdencrypt.nii.gz)"
    default_tokens = {"bSSFP": "C0", "LGE": "DE", "T2": "T2"}

    def sequence_token(self, case_id: str, modality: str) -> str:
        if re.fullmatch(_FOLDER_CASE, case_id):
            return _FOLDER_TOKENS[modality]
        return self.default_tokens[modality]

    def is_test(self, case_id: str) -> bool:
        return case_id.startswith("myops_test_")

    def label_encodings(self) -> tuple[LabelEncoding, ...]:
        return (OFFICIAL,)
