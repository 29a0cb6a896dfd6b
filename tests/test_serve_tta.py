"""Test-time augmentation in the Predictor: the mean softmax over the 8 flips and quarter
turns, checked against the model averaged over the transformed inputs by hand."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cellmodel.infer.predictor import DIHEDRAL, Predictor, dihedral
from cellmodel.models import build_model, save_checkpoint


def _by_hand(model, views: list[torch.Tensor]) -> np.ndarray:
    with torch.no_grad():
        return torch.stack([torch.softmax(model(v), dim=1) for v in views]).mean(0).numpy()


@pytest.fixture(scope="module")
def square(tmp_path_factory):
    torch.manual_seed(3)
    model = build_model("tiny_bilstm", input_size=(3, 64, 64)).eval()
    return model, save_checkpoint(model, str(tmp_path_factory.mktemp("tta") / "square"))


def test_tta_on_a_square_input_is_the_dihedral_group(square):
    model, ckpt = square
    x = torch.randn(3, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    views = [
        torch.rot90(torch.flip(x, dims=[3]) if flip else x, k, dims=[2, 3])
        for flip in (False, True)
        for k in range(4)
    ]
    for backend in ("eager", "onnx"):
        p = Predictor(ckpt, "cpu", backend=backend, tta=True)
        got = p.predict_arrays(x.numpy())
        np.testing.assert_allclose(got, _by_hand(model, views), atol=1e-5)
        np.testing.assert_allclose(got.sum(axis=1), 1.0, atol=1e-5)
    plain = Predictor(ckpt, "cpu").predict_arrays(x.numpy())
    assert np.abs(plain - got).max() > 1e-4  # TTA changes the answer; off by default


def test_tta_on_a_rectangle_turns_in_frame_with_mirrored_sides(tmp_path):
    """On 160x120 a quarter turn keeps the centre 120 columns (as rows) and mirrors the
    missing 20 columns in on each side, as the training augmentation does."""
    torch.manual_seed(4)
    model = build_model("tiny_bilstm").eval()
    ckpt = save_checkpoint(model, str(tmp_path / "rect"))
    x = torch.randn(2, 3, 120, 160, generator=torch.Generator().manual_seed(1))
    views = []
    for flip in (False, True):
        for k in range(4):
            v = torch.rot90(torch.flip(x, dims=[3]) if flip else x, k, dims=[2, 3])
            if k % 2:  # (2, 3, 160, 120): centre 120 rows, then 20 mirrored columns each side
                v = v[:, :, 20:140, :]
                v = torch.cat([v[..., :20].flip(-1), v, v[..., -20:].flip(-1)], dim=-1)
            views.append(v)
    p = Predictor(ckpt, "cpu", tta=True)
    np.testing.assert_allclose(p.predict_arrays(x.numpy()), _by_hand(model, views), atol=1e-5)


def test_dihedral_transforms_are_distinct_and_invertible():
    x = np.arange(2 * 3 * 4 * 4, dtype=np.float32).reshape(2, 3, 4, 4)
    outs = [dihedral(x, k, f) for k, f in DIHEDRAL]
    assert len({o.tobytes() for o in outs}) == 8
    # Undo a turn-then-mirror: turn back, then mirror (mirroring is its own inverse).
    for (k, f), o in zip(DIHEDRAL, outs):
        back = np.rot90(o, -k, axes=(-2, -1))
        np.testing.assert_array_equal(back[..., ::-1] if f else back, x)
