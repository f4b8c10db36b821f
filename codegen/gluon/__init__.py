"""The Gluon kernel family for Hopper (sm90): warp-specialised TMA + ``warpgroup_mma``
pipelines for the forward (``forward.py``) and the two-pass backward (``backward.py``), reading
each row's kept intervals (``rows.py``) to find their blocks (``visit.py``). Where they run and
how to choose them: ``support.py``. GPU-only: the interpreter runs the ``tl`` family."""
