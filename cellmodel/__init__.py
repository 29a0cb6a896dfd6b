"""cellmodel: white-blood-cell classification (Xception + BiLSTM) trained and served on Ray."""

__version__ = "0.1.0"

CLASSES: tuple[str, ...] = ("EOSINOPHIL", "LYMPHOCYTE", "MONOCYTE", "NEUTROPHIL")
