"""Heat maps of a calibration: sites down, heads across, one panel per candidate (the
criterion's figure of kept softmax mass: the mean over rows, the minimum or a quantile) and one
for the choice (density of the chosen pattern, its number written in)."""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch

from sparse_compile.calibration.candidates import criterion_label

if TYPE_CHECKING:
    from sparse_compile.calibration.result import Calibration


def _grid(result: Calibration, value) -> torch.Tensor:
    """float64 ``[sites, max heads]`` of ``value(site, head)``, NaN where a site has fewer
    heads."""
    width = max(site.heads for site in result.sites)
    grid = torch.full((len(result.sites), width), math.nan, dtype=torch.float64)
    for i, site in enumerate(result.sites):
        for h in range(site.heads):
            grid[i, h] = value(site, h)
    return grid


def draw_calibration(result: Calibration, path: str) -> None:
    """Write ``path`` (PNG): ``len(candidates) + 1`` heat maps of ``sites × heads``, four to
    a row."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError as err:  # pragma: no cover - depends on the environment
        raise ImportError(
            "Calibration.draw needs matplotlib: pip install 'sparse_compile[draw]'") from err
    if not result.sites:
        raise ValueError("nothing to draw: no attention site was measured")
    panels = len(result.candidates) + 1
    columns = min(panels, 4)
    rows = math.ceil(panels / columns)
    sites, heads = len(result.sites), max(site.heads for site in result.sites)
    cell = 0.35
    fig, grid_axes = plt.subplots(rows, columns, squeeze=False, layout="constrained",
                                  figsize=(columns * max(2.5, heads * cell + 1.2),
                                           rows * max(2.0, sites * cell + 1.2)))
    axes = grid_axes.reshape(-1)
    for ax in axes[panels:]:
        ax.axis("off")
    labels = [site.key or "<root>" for site in result.sites]
    label = criterion_label(result.criterion)
    for j, candidate in enumerate(result.candidates):
        grid = _grid(result, lambda site, h, j=j: float(site.statistic[h, j]))
        image = _panel(axes[j], grid, f"{j + 1}: {candidate}\n{label} recall",
                       labels if j % columns == 0 else None)
    choice = _grid(result, lambda site, h: site.chosen_density(h))
    last = axes[panels - 1]
    _panel(last, choice, f"chosen ({label} recall ≥ {result.recall:g})\ndensity",
           labels if (panels - 1) % columns == 0 else None)
    for i, site in enumerate(result.sites):
        for h, j in enumerate(site.chosen):
            last.text(h, i, "D" if j is None else str(j + 1), ha="center", va="center",
                             fontsize=7, color="white" if choice[i, h] < 0.5 else "black")
    fig.colorbar(image, ax=axes[:panels].tolist(), shrink=0.8,
                 label="recall / density")
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _panel(ax, grid: torch.Tensor, title: str, labels: list[str] | None):
    image = ax.imshow(grid.numpy(), aspect="auto", interpolation="nearest", vmin=0.0,
                      vmax=1.0, cmap="viridis")
    ax.set_title(title, fontsize=8)
    ax.set_xlabel("head", fontsize=8)
    ax.set_xticks(range(grid.shape[1]))
    ax.set_yticks(range(grid.shape[0]))
    ax.set_yticklabels(labels if labels is not None else [""] * grid.shape[0], fontsize=7)
    ax.tick_params(axis="x", labelsize=7)
    return image
