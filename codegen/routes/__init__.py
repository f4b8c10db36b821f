"""Routes that reshape a pattern's work before the kernels run: strided patterns as residue
classes (``residue``) and strided unions as two parts merged by log-sum-exp
(``strided_union``)."""
