"""Calibration: which static pattern each attention site and head of a trained model tolerates.

``calibrate(model, *inputs, candidates=[...], recall=0.95)`` runs the model with its attention
probed and returns a :class:`Calibration` whose ``assign`` mapping the ``sparse`` backend takes
as it is. One job per module:

- ``candidates``: what may be measured (static patterns, a recall target in (0, 1], the
  criterion summarising per-row recall);
- ``instrument``: the calibration backend, which probes the sites the sparse backend finds;
- ``recall``: the blockwise measurement of kept softmax mass per head and candidate (sum,
  minimum and histogram over rows);
- ``choice``: the sparsest candidate reaching the target under the criterion, per site and
  head;
- ``result``: the result object, its table and its ``assign`` mapping;
- ``draw``: heat maps of a result;
- ``run``: ``calibrate`` itself.
"""

from sparse_compile.calibration.result import Calibration, CalibrationRow, SiteCalibration
from sparse_compile.calibration.run import calibrate

__all__ = ["Calibration", "CalibrationRow", "SiteCalibration", "calibrate"]
