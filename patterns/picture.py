"""Pictures of patterns: a compact text rendering and a PNG with block boundaries.

Both use the exact layout machinery to summarise cells, so they never build an ``lq x lk`` mask
for long sequences: each character (or pixel) is a tile of the layout at a coarser block size.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

import torch

from .errors import PatternError

if TYPE_CHECKING:
    from .nodes import Pattern

_CHARS = {0: ".", 1: "+", 2: "#"}  # EMPTY, PARTIAL, FULL


def _cells(p: Pattern, lq: int, lk: int, rows: int, cols: int) -> tuple[torch.Tensor, int, int]:
    """Kinds ``[n, r, c]`` of a coarse layout whose tiles fit in ``rows x cols`` cells."""
    cm, cn = max(1, -(-lq // rows)), max(1, -(-lk // cols))
    kinds = p.layout(lq, lk, cm, cn).kinds
    return (kinds if kinds.dim() == 3 else kinds[None]), cm, cn


def text_picture(
    p: Pattern, lq: int, lk: int, width: int = 64, block_m: int = 128, block_n: int = 128
) -> str:
    """Text picture: one character per cell of at most ``width`` columns (``#`` every entry
    kept, ``+`` some, ``.`` none), rows are queries, columns keys; headed by the densities of
    the ``block_m x block_n`` layout. Per-head patterns show each head pattern."""
    if p.is_dynamic:
        raise PatternError(f"'{p}' is dynamic: there is no static picture of it")
    layout = p.layout(lq, lk, block_m, block_n)
    if lq <= width and lk <= width:
        rows = lq  # small enough to show every entry
    else:
        # Characters are about twice as tall as wide: halve the rows to keep the shape.
        rows = min(lq, max(1, round(width * lq / max(1, lk) / 2)), width)
    kinds, cm, cn = _cells(p, lq, lk, rows, min(lk, width))
    lines = [
        f"pattern        {p}",
        f"lq x lk        {lq} x {lk}",
        f"density        {layout.density:.4f}",
        f"block density  {layout.block_density:.4f}  ({block_m} x {block_n} blocks)",
        f"cell           {cm} x {cn} entries  (# all kept, + some, . none)",
    ]
    for h in range(kinds.shape[0]):
        if kinds.shape[0] > 1:
            lines.append(f"head {h} (and every head h with h % {kinds.shape[0]} == {h}):")
        for row in kinds[h].tolist():
            lines.append("  " + "".join(_CHARS[v] for v in row))
    return "\n".join(lines)


def draw_png(p: Pattern, path: str, lq: int, lk: int, block_m: int, block_n: int) -> None:
    """PNG of the keep-mask (white kept, black dropped) with ``block_m x block_n`` tile
    boundaries; FULL tiles shaded green, PARTIAL orange. Needs matplotlib (extra ``draw``)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib.patches import Rectangle
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError(
            "drawing needs matplotlib: pip install 'sparse_compile[draw]'"
        ) from e
    if p.is_dynamic:
        raise PatternError(f"'{p}' is dynamic: there is no static picture of it")
    layout = p.layout(lq, lk, block_m, block_n)
    tiles = layout.kinds if layout.kinds.dim() == 3 else layout.kinds[None]
    pixels, cm, cn = _cells(p, lq, lk, 1024, 1024)
    n = pixels.shape[0]
    fig, axes = plt.subplots(1, n, figsize=(6 * n, 6 * max(lq, 1) / max(lk, 1) + 0.8),
                             squeeze=False)
    for h, ax in enumerate(axes[0]):
        # Exact when a pixel is one entry; otherwise grey marks pixels with only some kept.
        ax.imshow(pixels[h].float().numpy() / 2, cmap="gray", vmin=0, vmax=1,
                  extent=(0, lk, lq, 0), interpolation="nearest")
        for (i, j), kind in ((ij, int(tiles[h][ij])) for ij in _nonempty(tiles[h])):
            colour = "tab:green" if kind == 2 else "tab:orange"
            ax.add_patch(Rectangle((j * block_n, i * block_m), block_n, block_m,
                                   facecolor=colour, alpha=0.25, edgecolor="none"))
        for i in range(0, lq + 1, block_m):
            ax.axhline(i, color="tab:blue", linewidth=0.4)
        for j in range(0, lk + 1, block_n):
            ax.axvline(j, color="tab:blue", linewidth=0.4)
        ax.set_xlabel("key")
        ax.set_ylabel("query")
        title = str(p) if n == 1 else f"{p} (head {h})"
        ax.set_title(f"{title}\ndensity {layout.density:.3f}, "
                     f"block density {layout.block_density:.3f}", fontsize=9)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _nonempty(kinds: torch.Tensor):
    return (tuple(ij) for ij in (kinds > 0).nonzero().tolist())
