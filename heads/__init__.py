"""Stage-two heads: DA/DG models trained from cached features (DESIGN §5).

Importing this package registers every head; ``available()`` lists them and ``build(name, ...)`` makes one.
A new head is one file in this package, decorated with ``@register``, plus its import line below.
"""
from heads.base import (Head, HeadError, HParam, LabelledBatch, UnlabelledBatch, available, build, register,
                        resolve_hparams)
from heads import da_baselines, pooling, stdn, ta3n, trn  # noqa: F401  (importing a head's module registers it)

__all__ = ["Head", "HeadError", "HParam", "LabelledBatch", "UnlabelledBatch", "available", "build", "register",
           "resolve_hparams"]
