"""Stage-two models: architectures (``heads/architecture.py``) trained by methods (``heads/method.py``).

Importing this package registers every architecture and method; ``build(arch, method, ...)`` makes one. A new
method is one file in this package, decorated with ``@register_method``, plus its import line below (a new
architecture: ``@register_architecture``, the same way).
"""
from heads.architecture import Architecture, Encoding, architectures, register_architecture
from heads.base import HeadError, HParam, LabelledBatch, UnlabelledBatch
from heads.method import (Method, Preset, build, methods, preset, presets_for, register_method, register_preset,
                          resolve_hparams)
# importing a module registers what it defines; architectures first, then the methods over them
from heads import pooling, trn, stdn  # noqa: F401,E402
from heads import erm, ta3n, da_baselines, mixup, irm, ada, mada, cop, apn, stcda_method  # noqa: F401,E402
from heads import drl  # noqa: F401,E402  (after the methods it composes with)

__all__ = ["Architecture", "Encoding", "HeadError", "HParam", "LabelledBatch", "Method", "Preset",
           "UnlabelledBatch", "architectures", "build", "methods", "preset", "presets_for", "register_architecture",
           "register_method", "register_preset", "resolve_hparams"]
