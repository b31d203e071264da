"""Tuned-model weight schedules for dual-model sampling (combined generation and AIG).

At sampling step ``i`` of ``N`` (``i = 0`` is the noisiest step; this is the step *index*, never the
timestep value) the reward-tuned model gets weight ``w(i, N)`` in [0, 1] and the mixed prediction is
``(1 - w) * prediction_base + w * prediction_tuned`` (see SPEC.md section 1).

Specs understood by :func:`parse_schedule` (``str(schedule)`` gives back a spec that parses to an equal
schedule)::

    base                 w = 0
    tuned                w = 1
    switch:K             w = 1 if i >= K else 0           (combined generation, K >= 0 an integer step index)
    switch@F             w = 1 if i / N >= F else 0       (F a fraction in [0, 1])
    linear               w = i / N                        (AIG)
    power:P              w = (i / N) ** P                 (AIG, P > 0)
    cosine               w = (1 - cos(pi * i / N)) / 2
    keyframes:P0=W0,...  piecewise linear in progress i / N through the points (P, W); constant beyond
                         the first and last point (P in [0, 1] strictly increasing, W in [0, 1])

Note that with ``power:P`` (and ``linear``) the tuned weight never reaches 1: at the last step it is
``((N - 1) / N) ** P``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
__all__ = [
    "Schedule",
    "BaseOnly",
    "TunedOnly",
    "SwitchAtStep",
    "SwitchAtFraction",
    "Power",
    "Linear",
    "Cosine",
    "Keyframes",
    "parse_schedule",
    "ACCEPTED_FORMS",
]

ACCEPTED_FORMS = (
    "base, tuned, switch:K (integer K >= 0), switch@F (0 <= F <= 1), linear, power:P (P > 0), cosine, "
    "keyframes:P0=W0,P1=W1,... (P strictly increasing in [0, 1], W in [0, 1])"
)


def _fmt(value: float) -> str:
    """Shortest text that parses back to the same float (``2`` for 2.0, ``0.75`` for 0.75)."""
    value = float(value)
    return str(int(value)) if value.is_integer() else repr(value)


def _check_step(step: int, num_steps: int) -> None:
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    if not 0 <= step < num_steps:
        raise ValueError(f"step must be a step index in [0, {num_steps - 1}], got {step}")


class Schedule:
    """The tuned model's weight as a function of the sampling step index."""

    def weight(self, step: int, num_steps: int) -> float:
        """Tuned weight in [0, 1] at step index ``step`` (0 = noisiest) of ``num_steps``."""
        _check_step(step, num_steps)
        return float(self._weight(step, num_steps))

    def weights(self, num_steps: int) -> list[float]:
        """The weights of every step of an ``num_steps``-step run."""
        return [self.weight(i, num_steps) for i in range(num_steps)]

    @property
    def needs_tuned(self) -> bool:
        """Whether any step can give the tuned model a weight above 0 (only ``base`` never does)."""
        return True

    def _weight(self, step: int, num_steps: int) -> float:  # pragma: no cover - abstract
        raise NotImplementedError


@dataclass(frozen=True)
class BaseOnly(Schedule):
    """Base model only (w = 0)."""

    @property
    def needs_tuned(self) -> bool:
        return False

    def _weight(self, step: int, num_steps: int) -> float:
        return 0.0

    def __str__(self) -> str:
        return "base"


@dataclass(frozen=True)
class TunedOnly(Schedule):
    """Tuned model only (w = 1)."""

    def _weight(self, step: int, num_steps: int) -> float:
        return 1.0

    def __str__(self) -> str:
        return "tuned"


@dataclass(frozen=True)
class SwitchAtStep(Schedule):
    """Combined generation: base model for steps ``0..K-1``, tuned model from step index ``K`` on."""

    k: int

    def __post_init__(self) -> None:
        if isinstance(self.k, bool) or not isinstance(self.k, int) or self.k < 0:
            raise ValueError(f"switch:K needs an integer step index K >= 0, got {self.k!r}; accepted: {ACCEPTED_FORMS}")

    def _weight(self, step: int, num_steps: int) -> float:
        return 1.0 if step >= self.k else 0.0

    def __str__(self) -> str:
        return f"switch:{self.k}"


@dataclass(frozen=True)
class SwitchAtFraction(Schedule):
    """Combined generation by fraction: tuned model where ``step / num_steps >= f``."""

    f: float

    def __post_init__(self) -> None:
        if not (math.isfinite(self.f) and 0.0 <= self.f <= 1.0):
            raise ValueError(f"switch@F needs a fraction F in [0, 1], got {self.f!r}; accepted: {ACCEPTED_FORMS}")

    def _weight(self, step: int, num_steps: int) -> float:
        return 1.0 if step / num_steps >= self.f else 0.0

    def __str__(self) -> str:
        return f"switch@{_fmt(self.f)}"


@dataclass(frozen=True)
class Power(Schedule):
    """Annealed Importance Guidance: ``w = (step / num_steps) ** p``."""

    p: float

    def __post_init__(self) -> None:
        if not (math.isfinite(self.p) and self.p > 0):
            raise ValueError(f"power:P needs an exponent P > 0, got {self.p!r}; accepted: {ACCEPTED_FORMS}")

    def _weight(self, step: int, num_steps: int) -> float:
        return (step / num_steps) ** self.p

    def __str__(self) -> str:
        return f"power:{_fmt(self.p)}"


@dataclass(frozen=True)
class Linear(Power):
    """AIG with a linear ramp: ``w = step / num_steps`` (``power:1``)."""

    p: float = 1.0

    def __post_init__(self) -> None:
        if self.p != 1.0:
            raise ValueError("Linear is power:1; use Power(p) for other exponents")

    def __str__(self) -> str:
        return "linear"


@dataclass(frozen=True)
class Cosine(Schedule):
    """Cosine ramp: ``w = (1 - cos(pi * step / num_steps)) / 2``."""

    def _weight(self, step: int, num_steps: int) -> float:
        return (1.0 - math.cos(math.pi * step / num_steps)) / 2.0

    def __str__(self) -> str:
        return "cosine"


@dataclass(frozen=True)
class Keyframes(Schedule):
    """Piecewise linear weight in progress ``step / num_steps`` through points ``(P, W)``."""

    points: tuple[tuple[float, float], ...]

    def __post_init__(self) -> None:
        if len(self.points) == 0:
            raise ValueError(f"keyframes needs at least one point P=W; accepted: {ACCEPTED_FORMS}")
        for p, w in self.points:
            if not (math.isfinite(p) and 0.0 <= p <= 1.0):
                raise ValueError(f"keyframe progress {p!r} is outside [0, 1]; accepted: {ACCEPTED_FORMS}")
            if not (math.isfinite(w) and 0.0 <= w <= 1.0):
                raise ValueError(f"keyframe weight {w!r} (at {p!r}) is outside [0, 1]; accepted: {ACCEPTED_FORMS}")
        ps = [p for p, _ in self.points]
        if any(b <= a for a, b in zip(ps, ps[1:])):
            raise ValueError(
                f"keyframe progress values must be strictly increasing, got {ps}; accepted: {ACCEPTED_FORMS}"
            )

    def _weight(self, step: int, num_steps: int) -> float:
        x = step / num_steps
        pts = self.points
        if x <= pts[0][0]:
            return pts[0][1]
        for (p0, w0), (p1, w1) in zip(pts, pts[1:]):
            if x <= p1:
                return w0 + (w1 - w0) * (x - p0) / (p1 - p0)
        return pts[-1][1]

    def __str__(self) -> str:
        return "keyframes:" + ",".join(f"{_fmt(p)}={_fmt(w)}" for p, w in self.points)


def _number(text: str, what: str, spec: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise ValueError(f"bad schedule {spec!r}: {what} {text!r} is not a number; accepted: {ACCEPTED_FORMS}") from None
    if not math.isfinite(value):
        raise ValueError(f"bad schedule {spec!r}: {what} {text!r} is not finite; accepted: {ACCEPTED_FORMS}")
    return value


def parse_schedule(spec: str | Schedule) -> Schedule:
    """Parse a schedule spec (see the module docstring); a :class:`Schedule` is returned unchanged.

    Raises ``ValueError`` naming the bad part and listing the accepted forms.
    """
    if isinstance(spec, Schedule):
        return spec
    if not isinstance(spec, str):
        raise ValueError(f"a schedule spec must be a string, got {type(spec).__name__}; accepted: {ACCEPTED_FORMS}")
    text = spec.strip().lower()
    if text == "base":
        return BaseOnly()
    if text == "tuned":
        return TunedOnly()
    if text == "linear":
        return Linear()
    if text == "cosine":
        return Cosine()
    if text.startswith("switch:"):
        arg = text[len("switch:"):]
        try:
            k = int(arg)
        except ValueError:
            raise ValueError(
                f"bad schedule {spec!r}: switch:K needs an integer step index, got {arg!r}; accepted: {ACCEPTED_FORMS}"
            ) from None
        if k < 0:
            raise ValueError(f"bad schedule {spec!r}: K must be >= 0, got {k}; accepted: {ACCEPTED_FORMS}")
        return SwitchAtStep(k)
    if text.startswith("switch@"):
        f = _number(text[len("switch@"):], "fraction F", spec)
        if not 0.0 <= f <= 1.0:
            raise ValueError(f"bad schedule {spec!r}: F must be in [0, 1], got {f}; accepted: {ACCEPTED_FORMS}")
        return SwitchAtFraction(f)
    if text.startswith("power:"):
        p = _number(text[len("power:"):], "exponent P", spec)
        if p <= 0:
            raise ValueError(f"bad schedule {spec!r}: P must be > 0, got {p}; accepted: {ACCEPTED_FORMS}")
        return Power(p)
    if text.startswith("keyframes:"):
        body = text[len("keyframes:"):]
        points: list[tuple[float, float]] = []
        for part in body.split(","):
            if "=" not in part:
                raise ValueError(
                    f"bad schedule {spec!r}: keyframe {part!r} is not of the form P=W; accepted: {ACCEPTED_FORMS}"
                )
            p_text, w_text = part.split("=", 1)
            points.append((_number(p_text, "keyframe progress", spec), _number(w_text, "keyframe weight", spec)))
        try:
            return Keyframes(tuple(points))
        except ValueError as err:
            raise ValueError(f"bad schedule {spec!r}: {err}") from None
    name = text.split(":")[0].split("@")[0]
    raise ValueError(f"unknown schedule {name!r} in {spec!r}; accepted: {ACCEPTED_FORMS}")

