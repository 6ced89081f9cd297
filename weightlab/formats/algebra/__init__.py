"""Adapter algebras: one module's ΔW from the factors a file stores. One module per algebra, registered by name.

Contract (:class:`Algebra`): ``suffixes`` maps the key suffix of each factor (``.hada_w1_a``) to its factor name;
``check(f, shape)`` says what is missing or inconsistent in the factors ``f`` (``shape`` None) or why they cannot
make a weight of ``shape`` (None when all is well); ``delta(f, shape)`` is the unscaled ΔW in fp32 with the
weight's shape; ``rank(f)`` is what an ``.alpha`` key is divided by (None: the algebra has no alpha, scale 1);
``bias`` names the factor holding a bias delta, if the algebra has one. The definitions are the defining
library's (lycoris-lora ``functional/``, cited per module); ``lora`` also keeps its factors for the fused kernels.

Refused algebras (:data:`REFUSED`) are named by a key suffix only they use, so a file holding them is refused by
name instead of being skipped as unknown keys.
"""

from weightlab.formats.algebra.base import (ALGEBRAS, REFUSED, Algebra, Factors, fold_spatial, of, register, shape_text,
                                            tucker)
from weightlab.formats.algebra import full, loha, lokr, lora  # each registers itself

__all__ = ["ALGEBRAS", "REFUSED", "Algebra", "Factors", "fold_spatial", "full", "loha", "lokr", "lora", "of", "register",
           "shape_text", "tucker"]
