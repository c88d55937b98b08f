"""Datasets (`--data SPEC`) and their transforms, built on torchvision and timm."""

from .datasets import DataSplits, SampleSet, SeededSampler, build_splits, collate_skipping

__all__ = ["DataSplits", "SampleSet", "SeededSampler", "build_splits", "collate_skipping"]
