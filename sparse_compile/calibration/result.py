"""What ``calibrate`` returns: per site, head and candidate the density and kept mass, the
choice, the ``assign`` mapping for the backend, and a printable table."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, replace

import torch

from sparse_compile.calibration.candidates import (
    Criterion,
    check_criterion,
    check_recall,
    criterion_label,
    criterion_words,
)
from sparse_compile.calibration.choice import (
    assigned_pattern,
    choose,
    densities,
    recall_statistic,
)
from sparse_compile.calibration.instrument import SiteRecord
from sparse_compile.fx.choose import site_key
from sparse_compile.patterns import Pattern


@dataclass(frozen=True)
class SiteCalibration:
    """One measured attention site.

    ``key`` is its ``assign`` key (the module path, with ``#index`` when the module holds
    several sites); ``lq``, ``lk`` the longest calibration lengths, at which densities are
    taken. ``mean``, ``minimum``, ``density``: float64 ``[H, C]`` over heads and candidates
    (``H = 1`` when ``pooled``: 3-D attention, whose batch axis mixes batch and heads);
    ``histogram``: int64 ``[H, C, RECALL_BINS + 1]``, the counted rows per bin of kept mass
    (quantiles come from it: :meth:`quantile`); ``statistic``: float64 ``[H, C]``, the figure
    the choice compared with the target (the criterion's); ``chosen[h]`` is the index of head
    ``h``'s candidate, None for ``dense``; ``pattern`` what ``assign`` gives the site; ``rows``
    how many query rows were counted per head.
    """

    key: str
    module_path: str
    index: int | None
    form: str
    lq: int
    lk: int
    pooled: bool
    mean: torch.Tensor
    minimum: torch.Tensor
    density: torch.Tensor
    rows: torch.Tensor
    histogram: torch.Tensor
    statistic: torch.Tensor
    chosen: tuple[int | None, ...]
    pattern: Pattern

    @property
    def heads(self) -> int:
        return self.mean.shape[0]

    def quantile(self, q: float) -> torch.Tensor:
        """float64 ``[H, C]``: the ``q``-quantile of per-row kept mass (``q`` in (0, 1)), to
        ``1 / RECALL_BINS`` below the exact figure at most."""
        return recall_statistic(check_criterion(q), self.mean, self.minimum, self.histogram)

    def chosen_density(self, head: int) -> float:
        """Density of what head ``head`` keeps under the choice (1 for ``dense``)."""
        j = self.chosen[head]
        return 1.0 if j is None else float(self.density[head, j])


@dataclass(frozen=True)
class CalibrationRow:
    """One line of the table: a site's head under one candidate (``head`` None: pooled);
    ``statistic`` is the figure the choice compared with the target (the mean recall under
    ``criterion="mean"``)."""

    site: str
    head: int | None
    candidate: str
    density: float
    mean_recall: float
    min_recall: float
    chosen: bool
    statistic: float


class Calibration:
    """The result of :func:`sparse_compile.calibrate`.

    ``print(result)`` shows one row per site, head and candidate (density at the calibration
    length, mean and minimum kept softmax mass over query rows, the criterion's quantile when
    it is one, which one was chosen); ``result.assign`` is the mapping to pass as
    ``options={"assign": result.assign}``; ``result.density`` the share of attention entries
    the chosen patterns keep; ``result.draw(path)`` writes heat maps (matplotlib);
    ``result.at_recall(0.99)`` (or ``at_recall(0.95, criterion=0.01)``) chooses again without
    rerunning the model. ``sites`` holds the measurements, ``skipped`` the
    ``(module path, reason)`` of sites that were not measured; ``criterion`` is the statistic
    of per-row recall the choice used (``"mean"``, ``"min"`` or a quantile level).
    """

    def __init__(self, candidates: Sequence[Pattern], recall: float,
                 sites: Sequence[SiteCalibration], skipped: Sequence[tuple[str, str]],
                 criterion: Criterion = "mean"):
        self.candidates = tuple(candidates)
        self.recall = recall
        self.criterion = criterion
        self.sites = list(sites)
        self.skipped = list(skipped)

    @classmethod
    def from_records(cls, records: Iterable[SiteRecord], candidates: Sequence[Pattern],
                     recall: float, criterion: Criterion = "mean") -> Calibration:
        """Choose for every measured record and key it as the backend's ``assign`` does."""
        records = list(records)
        per_module = Counter(r.module_path for r in records if r.index is not None)
        sites, skipped = [], []
        for r in records:
            if r.reason is not None or r.mass is None:
                skipped.append((r.module_path, r.reason or "never ran"))
                continue
            index = r.index if per_module[r.module_path] > 1 else None
            mean, minimum, histogram = r.mass.mean, r.mass.minimum, r.mass.histogram.clone()
            statistic = recall_statistic(criterion, mean, minimum, histogram)
            density = densities(candidates, r.mass.heads, r.merged_heads, r.lq, r.lk)
            chosen = tuple(choose(statistic, density, recall))
            sites.append(SiteCalibration(
                site_key(r.module_path, index), r.module_path, r.index, r.form, r.lq, r.lk,
                r.merged_heads, mean, minimum, density, r.mass.rows.clone(), histogram,
                statistic, chosen, assigned_pattern(candidates, chosen, r.merged_heads)))
        return cls(candidates, recall, sites, skipped, criterion)

    def at_recall(self, recall: float, criterion: Criterion | None = None) -> Calibration:
        """The same measurements, chosen for another recall target and, when given, another
        criterion (default: this result's); nothing is rerun."""
        target = check_recall(recall)
        rule = self.criterion if criterion is None else check_criterion(criterion)
        sites = []
        for site in self.sites:
            statistic = recall_statistic(rule, site.mean, site.minimum, site.histogram)
            chosen = tuple(choose(statistic, site.density, target))
            sites.append(replace(site, statistic=statistic, chosen=chosen,
                                 pattern=assigned_pattern(self.candidates, chosen, site.pooled)))
        return Calibration(self.candidates, target, sites, self.skipped, rule)

    @property
    def assign(self) -> dict[str, str]:
        """``{assign key: DSL text}`` for every measured site, in graph order: a pattern, or
        ``heads(...)`` when heads differ, ``dense`` where no candidate reaches the target."""
        return {site.key: str(site.pattern) for site in self.sites}

    @property
    def density(self) -> float:
        """Kept fraction of all attention entries under the chosen patterns: per-head
        densities at the calibration length, each head weighted by its ``lq · lk``."""
        kept = total = 0.0
        for site in self.sites:
            for h in range(site.heads):
                kept += site.chosen_density(h) * site.lq * site.lk
                total += site.lq * site.lk
        return kept / total if total else 1.0

    @property
    def rows(self) -> list[CalibrationRow]:
        """The table's rows; a head where no candidate reaches the target gets a ``dense``
        row (density 1, recall 1) marked chosen."""
        rows = []
        for site in self.sites:
            for h in range(site.heads):
                head = None if site.pooled else h
                for j, candidate in enumerate(self.candidates):
                    rows.append(CalibrationRow(
                        site.key, head, str(candidate), float(site.density[h, j]),
                        float(site.mean[h, j]), float(site.minimum[h, j]),
                        site.chosen[h] == j, float(site.statistic[h, j])))
                if site.chosen[h] is None:
                    rows.append(CalibrationRow(site.key, head, "dense", 1.0, 1.0, 1.0, True,
                                               1.0))
        return rows

    def __str__(self) -> str:
        quantile = not isinstance(self.criterion, str)
        header = ("site", "head", "candidate", "density", "mean recall", "min recall",
                  *([f"{criterion_label(self.criterion)} recall"] if quantile else []),
                  "chosen")
        table = [header] + [(
            r.site or "<root>", "all" if r.head is None else str(r.head), r.candidate,
            f"{r.density:.3f}", f"{r.mean_recall:.4f}", f"{r.min_recall:.4f}",
            *([f"{r.statistic:.3f}"] if quantile else []),
            "yes" if r.chosen else "") for r in self.rows]
        widths = [max(len(row[i]) for row in table) for i in range(len(header))]
        lines = ["  ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)).rstrip()
                 for row in table]
        lines.insert(1, "  ".join("-" * w for w in widths))
        heads = sum(site.heads for site in self.sites)
        lines.append(f"{len(self.sites)} attention site(s), {heads} head(s), target recall "
                     f"{self.recall:g} ({criterion_words(self.criterion)}): the chosen "
                     f"patterns keep {self.density:.3f} of the attention entries")
        lines += [f"not measured: {path or '<root>'}: {reason}" for path, reason in self.skipped]
        return "\n".join(lines)

    def __repr__(self) -> str:
        return (f"<Calibration: {len(self.sites)} site(s), {len(self.candidates)} "
                f"candidate(s), recall {self.recall:g} ({criterion_label(self.criterion)}), "
                f"density {self.density:.3f}>")

    def draw(self, path: str) -> None:
        """Write a PNG of heat maps, sites down, heads across: the criterion's recall figure of
        every candidate (the mean under ``"mean"``), and the density of the choice (needs
        matplotlib)."""
        from sparse_compile.calibration.draw import draw_calibration

        draw_calibration(self, path)

