"""Prediction (``cmcseg predict``): raw cases in, segmentations on each case's original reference grid out.

The steps live in modules of their own:

* :mod:`.cases` finds the cases of an input folder (nnU-Net naming or a dataset's native naming);
* :mod:`.model` loads a trained model folder (plans, dataset.json, folds, checkpoints) and refuses mismatches;
* :mod:`cmcseg.sliding_window` (below prediction and training, which both use it) is the Gaussian sliding
  window with mirroring TTA and fold ensembling;
* :mod:`.revert` brings probabilities back to the reference modality's original grid and writes them;
* :mod:`.predictor` is the batch loop (background preprocessing and export, per-case fault handling).

Import from the submodules; this package module stays light (no torch) so that ``cmcseg --help`` is fast.
"""
