"""SLERP coefficients in plain numpy/math: what strategies need of spherical interpolation.

M2N2's crossover (Abrantes et al., "Competition and Attraction Improve Model Fusion", 2025, eq. 2)
as the authors' code computes it: one angle Ω between two whole parameter vectors, linear
interpolation when ``sin Ω ≤ 1e-6``. Strategies breed with these coefficients and the merge
kernel (``evomerge.merge.slerp``) writes tensors with the same ones, so both agree to the bit
without a strategy importing torch.
"""

from __future__ import annotations

import math

SPLIT_SIN_EPS = 1e-6


def split_slerp_coefficients(t: float, cos_omega: float) -> tuple[float, float]:
    """Coefficients ``(s0, s1)`` of M2N2's SLERP: ``slerp(t; a, b) = s0·a + s1·b``."""
    omega = math.acos(max(-1.0, min(1.0, cos_omega)))
    sin_omega = math.sin(omega)
    if sin_omega <= SPLIT_SIN_EPS:
        return 1.0 - t, t
    return math.sin((1.0 - t) * omega) / sin_omega, math.sin(t * omega) / sin_omega
