"""Data: dataset readers → checked splits → datasets and loaders. Knows nothing of the models.

readers.py reads each published layout into samples; splits.py checks the files and splits
them; loading.py makes datasets and loaders; store.py keeps decoded pixels; views.py holds the
training views; images.py decodes robustly; synthetic.py, world.py and worlds.py generate the
seeded synthetic data of the tests and the demo.
"""
from .loading import EmotionImages, EpochSampler, eval_loader, make_dataset, make_loader
from .readers import READERS, SPLITS, DataError, Problem, Sample, read_manifest, write_manifest
from .splits import (DatasetSplits, check_dataset, describe_problems, load_split_files, load_splits,
                     stratified_split)

__all__ = ["READERS", "SPLITS", "DataError", "DatasetSplits", "EmotionImages", "EpochSampler", "Problem", "Sample",
           "check_dataset", "describe_problems", "eval_loader", "load_split_files", "load_splits", "make_dataset",
           "make_loader", "read_manifest", "stratified_split", "write_manifest"]
