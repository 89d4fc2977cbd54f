"""Frozen configuration dataclasses. YAML and CLI flags are validated into these at the edge."""
from __future__ import annotations

from dataclasses import dataclass

METHODS = ("ot", "global")


def resolve_device(device: str | None = "auto"):
    """torch.device for "auto" (CUDA when available), "cpu", "cuda", "cuda:N"; ConfigError otherwise."""
    import torch

    from guardalign.errors import ConfigError

    if device in (None, "", "auto"):
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError) as exc:
        raise ConfigError(f"invalid --device {device!r}: expected auto, cpu, cuda or cuda:N ({exc})") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError(f"--device {device!r} requested but CUDA is not available; use --device cpu or auto")
    return dev


def n_windows(grid: int, stride: float = 1.0) -> int:
    """Windows per side of a grid: ``grid`` at stride 1, else ``ceil((grid − 1)/stride) + 1``."""
    import math
    from fractions import Fraction

    if stride >= 1:
        return int(grid)
    return math.ceil(Fraction(int(grid) - 1) / Fraction(stride).limit_denominator(10**6)) + 1


PATCH_MODES = ("grid", "search", "dense")
# --patches mode → (grid, scales) used when they are not given: grid 5×5 + 2×2 (30 encodes, bench/RESULTS.md issue 13);
# search re-cuts a 3×3 coarse grid. Dense mode ignores both.
LAYOUT_DEFAULTS = {"grid": (5, (2,)), "search": (3, ()), "dense": (5, (2,))}
DENSE_PATHS = ("maskclip", "clearclip", "sclip")  # same tuple as guardalign.models.patches (torch-free copy)
WEIGHTINGS = ("entropy", "uniform", "entropy_positive")
AGGREGATES = ("normalized", "paper")


@dataclass(frozen=True)
class EncoderConfig:
    model: str = "ViT-B-32"  # open_clip registry name, or path to an open_clip model-config JSON
    pretrained: str = "openai"  # open_clip pretrained tag, a local checkpoint path, or "none" (random weights)
    device: str = "auto"  # "auto" (cuda if available), "cpu", "cuda", "cuda:1", ...
    precision: str = "fp32"  # "fp32", "fp16" or "bf16" for the image tower


@dataclass(frozen=True)
class DetectConfig:
    method: str = "ot"  # "ot" (entropy-weighted optimal transport over patches) or "global" (ETA cosine baseline)
    patches: str = "grid"  # "grid" (crop the windows of `grid` and `scales`; default 5×5 + 2×2, bench/RESULTS.md issue 13), "search" (coarse windows, then re-cut the most suspicious within `budget` encodes) or "dense" (one forward pass)
    grid: int | None = None  # grid and search modes: windows per side (coarse layout in search mode); None: 5 in grid mode, 3 in search mode (LAYOUT_DEFAULTS)
    stride: float = 1.0  # grid and search modes: window stride as a fraction of the window; < 1 overlaps windows
    scales: tuple[int, ...] | None = None  # grid and search modes: extra grid sizes (multi-scale), e.g. (2, 4); None: (2,) with the default grid, else ()
    budget: int = 28  # search mode: most image-tower forwards per image (whole image + coarse + refined windows)
    refine_scale: float = 0.5  # search mode: a refined window is re-cut into 3×3 windows this fraction of its side, at stride 0.5
    dense_path: str = "maskclip"  # dense mode: "maskclip" (value path), "clearclip" (q–q attention) or "sclip" (correlative)
    tau: float | None = None  # override every category's τ in [0, 2] (None: take τ from the anchors YAML; 0 flags nothing)
    theta: float = 0.16  # global method: unsafe when cos(image, category mean) ≥ θ (ETA's value)
    eps: float = 0.05  # entropic regularisation ε of the Sinkhorn problems
    max_iter: int = 1000  # Sinkhorn iteration cap
    sinkhorn_tol: float = 1e-6  # Sinkhorn marginal-violation tolerance
    patch_weighting: str = "entropy"  # a^m: "entropy" (softmax(−h), ruling), "uniform", "entropy_positive" (softmax(+h), paper print)
    variant_weighting: str = "entropy"  # b_i^n: same choices as patch_weighting
    aggregate: str = "normalized"  # decision score: "normalized" d_i(m) (ruling) or "paper" d_paper(m)
    batch_size: int = 32  # images per encoder batch

    def __post_init__(self) -> None:
        """Fill a grid/scales left as None: the --patches mode's default layout (LAYOUT_DEFAULTS) when grid is None,
        else no extra scales (``grid=3`` alone means the 3×3 grid)."""
        grid, scales = LAYOUT_DEFAULTS.get(self.patches, LAYOUT_DEFAULTS["grid"])
        if self.scales is None:
            object.__setattr__(self, "scales", scales if self.grid is None else ())
        if self.grid is None:
            object.__setattr__(self, "grid", grid)
        elif not isinstance(self.scales, tuple):
            object.__setattr__(self, "scales", tuple(self.scales))

    def validate(self) -> "DetectConfig":
        """Return self, or raise ConfigError naming the bad field."""
        from guardalign.errors import ConfigError

        checks = [
            ("method", self.method in METHODS, f"one of {METHODS}"),
            ("patches", self.patches in PATCH_MODES, f"one of {PATCH_MODES}"),
            ("grid", isinstance(self.grid, int) and 1 <= self.grid <= 32, "an integer in [1, 32]"),
            ("stride", 0 < self.stride <= 1, "a fraction in (0, 1]"),
            ("scales", all(isinstance(s, int) and 1 <= s <= 32 for s in self.scales), "integers in [1, 32]"),
            ("budget", isinstance(self.budget, int) and self.budget >= 1, "a positive integer"),
            ("refine_scale", 0 < self.refine_scale <= 1, "a fraction in (0, 1]"),
            ("dense_path", self.dense_path in DENSE_PATHS, f"one of {DENSE_PATHS}"),
            ("tau", self.tau is None or 0 <= self.tau <= 2, "a number in [0, 2] (a cost 1 − cos; 0 flags nothing)"),
            ("theta", -1 <= self.theta <= 1, "a cosine in [-1, 1]"),
            ("eps", self.eps > 0, "a positive number"),
            ("patch_weighting", self.patch_weighting in WEIGHTINGS, f"one of {WEIGHTINGS}"),
            ("variant_weighting", self.variant_weighting in WEIGHTINGS, f"one of {WEIGHTINGS}"),
            ("aggregate", self.aggregate in AGGREGATES, f"one of {AGGREGATES}"),
            ("batch_size", self.batch_size >= 1, "a positive integer"),
        ]
        for field, ok, expected in checks:
            if not ok:
                raise ConfigError(f"invalid {field}={getattr(self, field)!r}: expected {expected}")
        if self.method == "ot" and self.patches == "search" and self.budget < 1 + self.coarse_windows():
            raise ConfigError(f"invalid budget={self.budget}: the coarse layout alone needs 1 + "
                              f"{self.coarse_windows()} encodes per image (raise --budget or use a smaller --grid)")
        return self

    def coarse_windows(self) -> int:
        """Windows per image of the grid layout (grid, stride, scales): the coarse stage of search mode."""
        return sum(n_windows(g, self.stride) ** 2 for g in dict.fromkeys([self.grid, *self.scales]))

    def search_plan(self) -> tuple[int, int]:
        """Search mode: (coarse windows refined, windows cut from each) that fit in ``budget`` encodes."""
        per = 9  # windows cut from each refined window (guardalign.models.patches.refine_boxes)
        coarse = self.coarse_windows()
        return max(0, min(coarse, (self.budget - 1 - coarse) // per)), per

    def encodes(self) -> int:
        """Image-tower forwards per image that this configuration costs."""
        if self.method == "global" or self.patches == "dense":
            return 1
        if self.patches == "grid":
            return 1 + self.coarse_windows()
        top, per = self.search_plan()
        return 1 + self.coarse_windows() + top * per
