"""No-change augmentation: instructions naming something absent, with output = input."""

from dsbuild.augment.stage import run_augment

__all__ = ["run_augment"]
