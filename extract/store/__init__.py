"""Feature store API: one logical model (maps / pooled / steps per video and stream), zarr v3 or HDF5 parts."""
from .part_writer import FeatureValueError, PartWriter, VideoWriter
from .store import BACKENDS, DEFAULT_STREAM, FeatureStore, StoreError, VideoRecord

__all__ = ["BACKENDS", "DEFAULT_STREAM", "FeatureStore", "FeatureValueError", "PartWriter", "StoreError",
           "VideoRecord", "VideoWriter"]
