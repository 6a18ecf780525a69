"""ERM: empirical risk minimisation on the source labels, the "source only" row of every table.

The smallest method, and the one to copy for a new method: the loss terms in ``objective``, the rest inherited.
"""
from __future__ import annotations

from torch import Tensor

from heads.base import LabelledBatch, UnlabelledBatch
from heads.method import Method, register_method


@register_method
class ERM(Method):
    """L_y = CE on the source videos (TA3N eq. 1), plus the architecture's own losses (STDN eq. 8)."""

    name = "erm"
    summary = "empirical risk minimisation: cross-entropy on source labels (the source-only baseline)"

    def objective(self, src: LabelledBatch, tgt: UnlabelledBatch | None,
                  progress: float) -> tuple[dict[str, Tensor], dict[str, float]]:
        """The source batch only: ``tgt`` is ignored, in ``da`` as in ``dg``."""
        encoding = self.arch.encode(src.x)
        logits = self.arch.classify(self.arch.aggregate(encoding.parts))
        return self.supervised_terms(encoding, logits, src.y), {}
