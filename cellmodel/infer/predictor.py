"""Bytes or arrays in, class probabilities out, for a checkpoint loaded once."""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch

from cellmodel.data.transforms import stack_bytes
from cellmodel.models.checkpoint import load_checkpoint


class Predictor:
    """A checkpoint ready for inference: eval mode, no autograd, channels_last on 4-D input."""

    def __init__(self, checkpoint: str, device: str | None = None) -> None:
        self.device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.model, self.meta = load_checkpoint(checkpoint, map_location=self.device)
        self.model = self.model.to(memory_format=torch.channels_last)
        self.cfg = self.model.cfg
        self.classes = list(self.cfg.classes)

    @torch.inference_mode()
    def predict_arrays(self, x: np.ndarray) -> np.ndarray:
        """Probabilities (N, num_classes) for a preprocessed float32 batch (N, 3, H, W)."""
        t = torch.from_numpy(np.ascontiguousarray(x)).to(self.device)
        t = t.contiguous(memory_format=torch.channels_last)
        return torch.softmax(self.model(t).float(), dim=1).cpu().numpy()

    def predict_bytes(self, images: Sequence[bytes]) -> np.ndarray:
        """Probabilities for encoded images; raises ``ImageDecodeError`` on a bad one."""
        return self.predict_arrays(stack_bytes(images, self.cfg))
