"""Representation diagnostics: what a loss does to the embedding space.

Pure, vectorised functions on embeddings (:mod:`.geometry`, :mod:`.retrieval`, :mod:`.probe`), pictures
(:mod:`.plot`) and the run-level entry point :func:`run_diagnostics` (:mod:`.run`).
"""

from mlcl.diagnostics.geometry import alignment, alignment_uniformity, label_alignment_uniformity, uniformity
from mlcl.diagnostics.plot import embedding_grid, tsne_png
from mlcl.diagnostics.probe import linear_probe_map
from mlcl.diagnostics.retrieval import jaccard, label_retrieval_ap, retrieval_scores
from mlcl.diagnostics.run import Embeddings, extract, representation_metrics, run_diagnostics

__all__ = [
    "Embeddings",
    "alignment",
    "alignment_uniformity",
    "embedding_grid",
    "extract",
    "jaccard",
    "label_alignment_uniformity",
    "label_retrieval_ap",
    "linear_probe_map",
    "representation_metrics",
    "retrieval_scores",
    "run_diagnostics",
    "tsne_png",
    "uniformity",
]
