"""Power-law fitting in NumPy: ``y = a·x^b`` (log-space least squares) or ``y = c + a·x^b``.

The offset form is fitted by variable projection: for a fixed exponent ``b`` the model is linear
in ``(a, c)``, so ``(a, c)`` come from a linear least-squares solve and only ``b`` is searched
(a grid, then golden-section refinement). No scipy.
"""

import dataclasses
import math
from collections.abc import Callable

import numpy as np

__all__ = ["PowerLawFit", "fit_power_law", "golden_section_minimize"]

_INV_PHI = (math.sqrt(5.0) - 1.0) / 2.0


@dataclasses.dataclass(frozen=True)
class PowerLawFit:
    """``y = offset + coefficient · x^exponent``, with the fit's residual RMS and R²."""

    coefficient: float
    exponent: float
    offset: float
    rmse: float
    r2: float

    def __call__(self, x):
        return self.offset + self.coefficient * np.power(np.asarray(x, np.float64), self.exponent)

    def __str__(self) -> str:
        text = f"y = {self.coefficient:.6g} * x^{self.exponent:.6g}"
        if self.offset:
            text += f" + {self.offset:.6g}"
        return f"{text}  (rmse {self.rmse:.3g}, R^2 {self.r2:.6f})"


def golden_section_minimize(
    f: Callable[[float], float], lo: float, hi: float, tol: float = 1e-10, max_iter: int = 200
) -> float:
    """Minimizer of a unimodal ``f`` on ``[lo, hi]`` by golden-section search."""
    a, b = float(lo), float(hi)
    c, d = b - _INV_PHI * (b - a), a + _INV_PHI * (b - a)
    fc, fd = f(c), f(d)
    for _ in range(max_iter):
        if abs(b - a) <= tol * max(1.0, abs(a) + abs(b)):
            break
        if fc < fd:
            b, d, fd = d, c, fc
            c = b - _INV_PHI * (b - a)
            fc = f(c)
        else:
            a, c, fc = c, d, fd
            d = a + _INV_PHI * (b - a)
            fd = f(d)
    return (a + b) / 2.0


def _summary(x, y, coefficient, exponent, offset) -> PowerLawFit:
    pred = offset + coefficient * np.power(x, exponent)
    resid = y - pred
    ss_tot = float(np.sum((y - y.mean()) ** 2))
    r2 = 1.0 - float(np.sum(resid**2)) / ss_tot if ss_tot > 0 else 1.0
    rmse = float(np.sqrt(np.mean(resid**2)))
    return PowerLawFit(float(coefficient), float(exponent), float(offset), rmse, r2)


def fit_power_law(
    x, y, offset: bool = False, exponent_bounds: tuple[float, float] = (-4.0, 4.0)
) -> PowerLawFit:
    """Fits ``y = a·x^b`` or, with ``offset=True``, ``y = c + a·x^b``.

    Without offset the fit is ordinary least squares on ``log y = log a + b·log x`` (needs
    ``y > 0``). With offset it is least squares on ``y`` itself, the exponent searched within
    ``exponent_bounds``; a fit that lands on a bound says the data do not pin the exponent down.

    Args:
      x: positive abscissae, shape ``[n]``.
      y: ordinates, shape ``[n]``.
      offset: fit the additive constant ``c`` too (an irreducible loss, say).
      exponent_bounds: search interval for ``b`` in the offset fit.
    """
    x = np.asarray(x, np.float64).ravel()
    y = np.asarray(y, np.float64).ravel()
    if x.shape != y.shape:
        raise ValueError(f"x and y need the same length, got {x.size} and {y.size}")
    if np.any(x <= 0) or not np.all(np.isfinite(x)) or not np.all(np.isfinite(y)):
        raise ValueError("x must be positive and finite, y finite")
    if not offset:
        if x.size < 2:
            raise ValueError("a power-law fit needs at least 2 points")
        if np.any(y <= 0):
            raise ValueError("y must be positive for a power law without offset")
        slope, intercept = np.polyfit(np.log(x), np.log(y), 1)
        return _summary(x, y, math.exp(intercept), slope, 0.0)
    if x.size < 3:
        raise ValueError("a power-law fit with offset needs at least 3 points")
    # Scale x to order one so that x^b neither overflows nor underflows while b is searched.
    x_ref = float(np.exp(np.mean(np.log(x))))
    z = x / x_ref

    def solve(b: float) -> tuple[float, float, float]:
        design = np.stack([np.power(z, b), np.ones_like(z)], axis=1)
        (a_scaled, c), *_ = np.linalg.lstsq(design, y, rcond=None)
        sse = float(np.sum((design @ np.array([a_scaled, c]) - y) ** 2))
        return sse, a_scaled, c

    lo, hi = exponent_bounds
    grid = np.linspace(lo, hi, 801)
    sse = np.array([solve(b)[0] if b != 0 else np.inf for b in grid])
    i = int(np.argmin(sse))
    b = golden_section_minimize(
        lambda b: solve(b)[0], grid[max(i - 1, 0)], grid[min(i + 1, grid.size - 1)]
    )
    _, a_scaled, c = solve(b)
    return _summary(x, y, a_scaled * x_ref ** (-b), b, c)
