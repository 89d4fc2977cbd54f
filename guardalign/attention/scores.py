"""The pure part of attention calibration (GuardAlign Eqs. 12-14, DESIGN §1.2): the per-request spec, the
positions of T (instruction rows) and R (prefix columns), and the score modification Ẑ = Z + γ·M∘f(Z).

No I/O, no logging, no process state; torch is imported lazily inside the functions.
"""
from __future__ import annotations

import math

from dataclasses import dataclass

from guardalign.errors import ConfigError

MODES = ("scale", "paper", "pai", "off")


@dataclass(frozen=True)
class CalibrationSpec:
    mode: str = "scale"  # scale: Z·(1+γ) where Z>0 | paper: Z + γ·max(0,Z)·Z | pai: Z + γ|Z| | off
    gamma: float = 0.5  # amplification γ ≥ 0 (0.5: PAI's α for LLaVA; the paper gives no number)
    layers: tuple[int, int] | None = None  # [start, stop) decoder layers; None = the middle half [L//4, 3L//4)

    def validate(self) -> "CalibrationSpec":
        """Return self, or raise ConfigError naming the bad field."""
        if self.mode not in MODES:
            raise ConfigError(f"invalid calibration mode={self.mode!r}: expected one of {MODES}")
        g = self.gamma
        if isinstance(g, bool) or not isinstance(g, (int, float)) or not math.isfinite(g) or g < 0:
            raise ConfigError(f"invalid gamma={g!r}: expected a finite number ≥ 0")
        if self.layers is not None:
            ok = (isinstance(self.layers, tuple) and len(self.layers) == 2
                  and all(isinstance(x, int) and not isinstance(x, bool) for x in self.layers))
            if not ok:
                raise ConfigError(f"invalid layers={self.layers!r}: expected a pair of integers (start, stop)")
        return self

    @property
    def active(self) -> bool:
        """Whether any logit is modified at all (False for mode off and for γ = 0)."""
        return self.mode != "off" and self.gamma > 0

    def resolve_layers(self, n_layers: int) -> tuple[int, int]:
        """The calibrated layer range [start, stop) for a model with ``n_layers`` decoder layers.

        The default is ``[L//4, 3L//4)``, widened to one layer when that is empty (L < 2).
        Raises ConfigError when the range is empty or outside ``[0, n_layers]``.
        """
        self.validate()
        if isinstance(n_layers, bool) or not isinstance(n_layers, int) or n_layers < 1:
            raise ConfigError(f"invalid n_layers={n_layers!r}: expected a positive integer")
        if self.layers is None:
            start = n_layers // 4
            return start, max(start + 1, (3 * n_layers) // 4)
        start, stop = self.layers
        if not 0 <= start < stop <= n_layers:
            raise ConfigError(
                f"invalid layers={start}:{stop}: expected 0 ≤ start < stop ≤ {n_layers} (the model's layer count)"
            )
        return start, stop


def parse_layers(text: str) -> tuple[int, int]:
    """Parse the ``--layers A:B`` flag into ``(A, B)``; raise ConfigError naming the flag when malformed."""
    parts = str(text).split(":")
    try:
        if len(parts) != 2:
            raise ValueError
        return int(parts[0]), int(parts[1])
    except ValueError:
        raise ConfigError(f"invalid --layers {text!r}: expected START:STOP, e.g. 8:24") from None


@dataclass(frozen=True)
class Positions:
    prefix: tuple[tuple[int, int], ...]  # per batch row: R = [r0, r1) absolute key positions of the prefix
    instr_start: tuple[int, ...]  # per batch row: T = every query position ≥ t0 (question, then generated tokens)

    def __post_init__(self) -> None:
        if len(self.prefix) != len(self.instr_start) or not self.prefix:
            raise ConfigError(
                f"positions: {len(self.prefix)} prefix spans but {len(self.instr_start)} instr_start values "
                "(need one of each per batch row, at least one row)"
            )
        for row, ((r0, r1), t0) in enumerate(zip(self.prefix, self.instr_start)):
            if not 0 <= r0 <= r1 <= t0:
                raise ConfigError(
                    f"positions row {row}: need 0 ≤ r0 ≤ r1 ≤ t0 (prefix before the instruction), "
                    f"got prefix=[{r0}, {r1}) instr_start={t0}"
                )


def modify_scores(z, qk, mode: str, gamma: float, row_mask, col_mask):
    """Apply the calibration of ``mode`` to scaled logits on the pairs (i in T, j in R).

    Parameters
    ----------
    z : Tensor (..., n, k)
        Scaled attention logits Z = QKᵀ·scaling, before the mask.
    qk : Tensor (..., n, k) or None
        The similarity ⟨Q_i, K_j⟩ of the ``paper`` mode (ignored by the others). The attention function passes
        Z itself (the scaled product), so γ means the same for every head dimension.
    mode : str
        ``scale``: Z·(1+γ) where Z > 0; ``paper``: Z + γ·max(0, qk)·Z; ``pai``: Z + γ|Z|; ``off``: Z.
    gamma : float
        γ ≥ 0.
    row_mask : bool Tensor broadcastable to (..., n)
        True for query rows in T.
    col_mask : bool Tensor broadcastable to (..., k)
        True for key columns in R.

    Returns
    -------
    Tensor (..., n, k): Ẑ, equal to ``z`` outside the T×R pairs.
    """
    if mode not in MODES:
        raise ConfigError(f"invalid calibration mode={mode!r}: expected one of {MODES}")
    if mode == "off" or gamma == 0:
        return z
    if mode == "paper" and qk is None:
        raise ValueError("modify_scores: mode 'paper' needs qk")
    pair = row_mask[..., :, None] & col_mask[..., None, :]
    return _modify(z, qk, mode, pair.to(z.dtype) * gamma)


def _modify(z, qk, mode: str, gpair):
    """Ẑ = Z + γ·1[pair]·f(Z) with f = relu(Z) (scale: Z·(1+γ) where Z > 0), relu(qk)·Z (paper), |Z| (pai).
    ``gpair`` is γ on the (i∈T, j∈R) pairs and 0 elsewhere, broadcastable to z; off pairs keep Z exactly."""
    import torch

    if mode == "scale":
        return torch.addcmul(z, z.relu(), gpair)
    if mode == "pai":
        return torch.addcmul(z, z.abs(), gpair)
    return torch.addcmul(z, qk.relu() * z, gpair)
