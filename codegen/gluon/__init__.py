"""The Gluon kernel family for Hopper (sm90): warp-specialised TMA + ``warpgroup_mma``
pipelines, generated from the same layouts as the ``tl`` kernels. GPU-only: the interpreter
runs the ``tl`` family."""
