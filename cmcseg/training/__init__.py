"""Training: the shared trainer base, data loading, sampling, augmentation, checkpoints and the method trainers."""
