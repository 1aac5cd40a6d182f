"""Deployment: compressed sparse files (``save_sparse``/``load_sparse``), 2:4 semi-structured
weights (``to_semi_structured``) and checkpoint inspection (``sparsity inspect``).

Imported on first use only (it imports torch and safetensors); ``sparsity_core`` re-exports the
public names lazily.
"""

from __future__ import annotations

from ._format import SavedFile, SparseFormatError, load_sparse, save_sparse
from ._semi import LayerConversion, SemiStructuredReport, to_semi_structured

__all__ = sorted(
    ["LayerConversion", "SavedFile", "SemiStructuredReport", "SparseFormatError", "load_sparse", "save_sparse",
     "to_semi_structured"]
)
