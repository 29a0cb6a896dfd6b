"""Application metrics, exported with Serve's own on Ray's Prometheus endpoint.

``ray.serve.metrics`` adds the deployment, replica and application tags to each series.
"""

from __future__ import annotations

from ray.serve import metrics

# Batch sizes the classifier actually ran: shows whether dynamic batching is doing its job.
BATCH_BOUNDARIES = [1, 2, 4, 8, 16, 32, 64, 128]


def predictions_counter() -> metrics.Counter:
    return metrics.Counter(
        "cellmodel_predictions",
        description="Images classified, by predicted class.",
        tag_keys=("class_name",),
    )


def rejected_counter() -> metrics.Counter:
    return metrics.Counter(
        "cellmodel_rejected_inputs",
        description="Requests refused for a client mistake, by reason.",
        tag_keys=("reason",),
    )


def batch_size_histogram() -> metrics.Histogram:
    return metrics.Histogram(
        "cellmodel_batch_size",
        description="Images per model forward in the classifier.",
        boundaries=BATCH_BOUNDARIES,
    )
