"""Data: image decoding and preprocessing shared by ingest, training, evaluation and serving."""
