"""Feature store API: one logical model (maps / pooled / steps per video and stream), zarr v3 or HDF5 parts."""
from .part_writer import FeatureValueError, PartSequence, PartWriter, VideoWriter
from .store import BACKENDS, DEFAULT_STREAM, FeatureStore, StoreError, VideoRecord

__all__ = ["BACKENDS", "DEFAULT_STREAM", "FeatureStore", "FeatureValueError", "PartSequence", "PartWriter", "StoreError",
           "VideoRecord", "VideoWriter"]
