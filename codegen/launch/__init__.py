"""Launch planning shared by every kernel family: tile configurations (``config``), how a
launch finds its blocks on the device (``tables``) and Hopper TMA descriptors (``tma``)."""
