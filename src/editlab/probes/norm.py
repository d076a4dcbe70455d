"""`norm` probe: the size of the accumulated weight change (spec section 2.7).

For every parameter that the active weight edits changed (the LM's weight ledger keeps each one's
original value): growth = |W_c - W_0|_F / |W_0|_F and ratio = |W_c|_F / |W_0|_F; the probe reports
the max and the mean of each over those matrices and how many there are. Methods that add parameters
or answer through a view (GRACE, WISE, SERAC, IKE, ...) change no base matrix: 0 matrices, growth 0.
"""

from __future__ import annotations

from typing import Any, ClassVar

from .base import Probe


class NormGrowth(Probe):
    name = "norm"
    description = "|W_c - W_0|_F / |W_0|_F of every weight matrix the active edits changed (max, mean)"
    metrics: ClassVar[tuple[str, ...]] = ("norm_growth_max", "norm_growth_mean", "norm_ratio_max", "norm_ratio_mean",
                                          "matrices_changed")
    headline: ClassVar[tuple[str, ...]] = ("norm_growth_max",)

    def prepare(self, lm: Any) -> None:
        pass  # the ledger holds the originals of whatever the edits touch

    def measure(self, system: Any, lm: Any) -> dict[str, float]:
        import torch

        from ..methods.patches import WeightLedger

        ledger = WeightLedger.of(lm)
        growth, ratio = [], []
        with torch.no_grad():
            for key, orig in ledger.originals.items():
                w0 = orig.float()
                wc = ledger.params[key].detach().float()
                n0 = float(torch.linalg.vector_norm(w0))
                if n0 == 0.0:
                    continue
                growth.append(float(torch.linalg.vector_norm(wc - w0)) / n0)
                ratio.append(float(torch.linalg.vector_norm(wc)) / n0)
        if not growth:
            return {"norm_growth_max": 0.0, "norm_growth_mean": 0.0, "norm_ratio_max": 1.0, "norm_ratio_mean": 1.0,
                    "matrices_changed": 0.0}
        return {"norm_growth_max": max(growth), "norm_growth_mean": sum(growth) / len(growth),
                "norm_ratio_max": max(ratio), "norm_ratio_mean": sum(ratio) / len(ratio),
                "matrices_changed": float(len(growth))}
