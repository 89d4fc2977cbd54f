"""Inline SVG plots of the HTML report: score histograms with the threshold, per-layer attention lines.

Every label that can come from a record goes through :func:`esc` (which the page module uses too).
"""
from __future__ import annotations

import html


def esc(value) -> str:
    """HTML-escape anything (quotes too, so it is safe inside attributes)."""
    return html.escape(str(value), quote=True)


def svg_histogram(stacks: list[tuple[str, list[int], str]], lo: float, hi: float, tau: float | None, *,
                  unsafe_le: bool, w: int = 640, h: int = 180, small: bool = False, label: str = "", word: str = "τ") -> str:
    """Stacked bar histogram over [lo, hi] with the threshold line and the unsafe side shaded."""
    L, R, T, B = (4, 4, 4, 4) if small else (48, 14, 20, 30)
    pw, ph, n = w - L - R, h - T - B, len(stacks[0][1])
    tot = [sum(s[1][k] for s in stacks) for k in range(n)]
    ymax = max(tot) or 1
    sx = lambda v: L + (v - lo) / (hi - lo) * pw  # noqa: E731
    p = [f'<svg class=plot width="{w}" height="{h}" viewBox="0 0 {w} {h}" role=img aria-label="{esc(label)}">']
    if tau is not None and lo <= tau <= hi:
        x0, x1 = (L, sx(tau)) if unsafe_le else (sx(tau), L + pw)
        p.append(f'<rect x="{x0:.1f}" y="{T}" width="{x1 - x0:.1f}" height="{ph}" fill="#fbe3e1"/>')
    bw, step = pw / n, (hi - lo) / n
    for k in range(n):
        y = T + ph
        for name, counts, colour in stacks:
            if counts[k]:
                bh = counts[k] / ymax * ph
                y -= bh
                p.append(f'<rect x="{L + k * bw + 0.5:.1f}" y="{y:.1f}" width="{max(bw - 1, 0.8):.1f}" height="{bh:.1f}" '
                         f'fill="{colour}"><title>{esc(name)} {lo + k * step:.4f} to {lo + (k + 1) * step:.4f}: '
                         f'{counts[k]}</title></rect>')
    p.append(f'<line x1="{L}" y1="{T + ph}" x2="{L + pw}" y2="{T + ph}" stroke="#888"/>')
    if not small:
        p.append(f'<text x="{L - 6}" y="{T + 8}" font-size="11" text-anchor="end">{ymax}</text>'
                 f'<text x="{L - 6}" y="{T + ph}" font-size="11" text-anchor="end">0</text>'
                 f'<text x="{L}" y="{h - 10}" font-size="11">{lo:.3f}</text>'
                 f'<text x="{L + pw}" y="{h - 10}" font-size="11" text-anchor="end">{hi:.3f}</text>')
    if tau is not None and lo <= tau <= hi:
        x = sx(tau)
        p.append(f'<line x1="{x:.1f}" y1="{T - (0 if small else 6)}" x2="{x:.1f}" y2="{T + ph}" stroke="#b00" '
                 f'stroke-width="{1.5 if small else 2}" stroke-dasharray="4 3"/>')
        if not small:
            p.append(f'<text x="{x + 4:.1f}" y="{T + 2}" font-size="12" fill="#b00">{word} = {tau:.4f}</text>')
    return "".join(p) + "</svg>"


def svg_lines(series: list[tuple[str, list[float | None], str]], *, band: list[int] | None = None,
              w: int = 640, h: int = 240) -> str:
    """Per-layer line plot (x = layer index); ``band`` [a, b) shades the calibrated layers."""
    L, R, T, B = (52, 14, 14, 46)
    pw, ph = w - L - R, h - T - B
    n = max(len(v) for _, v, _ in series)
    ys = [y for _, v, _ in series for y in v if y is not None]
    ymax = (max(ys) if ys else 1.0) * 1.1 or 1.0
    ymin = min(0.0, min(ys) if ys else 0.0)
    sx = lambda i: L + (i / (n - 1) * pw if n > 1 else pw / 2)  # noqa: E731
    sy = lambda v: T + ph - (v - ymin) / (ymax - ymin) * ph  # noqa: E731
    p = [f'<svg class=plot width="{w}" height="{h}" viewBox="0 0 {w} {h}" role=img aria-label="prefix attention per layer">']
    if band and n > 1:
        a, b = max(band[0], 0), min(band[1], n)
        x0, x1 = sx(a) - pw / (n - 1) / 2, sx(b - 1) + pw / (n - 1) / 2
        p.append(f'<rect x="{max(x0, L):.1f}" y="{T}" width="{min(x1, L + pw) - max(x0, L):.1f}" height="{ph}" fill="#fdf0d8">'
                 f'<title>calibrated layers [{a}, {b})</title></rect>')
    p.append(f'<line x1="{L}" y1="{T + ph}" x2="{L + pw}" y2="{T + ph}" stroke="#888"/>'
             f'<line x1="{L}" y1="{T}" x2="{L}" y2="{T + ph}" stroke="#888"/>')
    p.append(f'<text x="{L - 6}" y="{T + 8}" font-size="11" text-anchor="end">{ymax:.3f}</text>'
             f'<text x="{L - 6}" y="{T + ph}" font-size="11" text-anchor="end">{ymin:.3f}</text>')
    tick = max(1, n // 16)
    for i in range(0, n, tick):
        p.append(f'<text x="{sx(i):.1f}" y="{T + ph + 14}" font-size="10" text-anchor="middle">{i}</text>')
    p.append(f'<text x="{L + pw / 2:.1f}" y="{h - 18}" font-size="11" text-anchor="middle">layer</text>')
    for name, vals, colour in series:
        seg: list[str] = []
        for i, v in enumerate(vals + [None]):
            if v is None:
                if len(seg) > 1:
                    p.append(f'<polyline points="{" ".join(seg)}" fill="none" stroke="{colour}" stroke-width="2"/>')
                seg = []
                continue
            seg.append(f"{sx(i):.1f},{sy(v):.1f}")
            p.append(f'<circle cx="{sx(i):.1f}" cy="{sy(v):.1f}" r="3" fill="{colour}"><title>{esc(name)} layer {i}: '
                     f'{v:.4f}</title></circle>')
    lx = L
    for name, _, colour in series:
        p.append(f'<rect x="{lx}" y="{h - 12}" width="12" height="10" fill="{colour}"/>'
                 f'<text x="{lx + 16}" y="{h - 3}" font-size="11">{esc(name)}</text>')
        lx += 110
    if band:
        p.append(f'<rect x="{lx}" y="{h - 12}" width="12" height="10" fill="#fdf0d8" stroke="#e0c890"/>'
                 f'<text x="{lx + 16}" y="{h - 3}" font-size="11">calibrated layers [{band[0]}, {band[1]})</text>')
    return "".join(p) + "</svg>"
