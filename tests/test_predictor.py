"""Predictor: the checkpoint's own model, eager or ONNX Runtime, local or on S3."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from cellmodel import CLASSES
from cellmodel.data.transforms import ImageDecodeError, stack_bytes
from cellmodel.infer.export import ATOL, ExportError, export_onnx, onnx_forward
from cellmodel.infer.predictor import Predictor
from cellmodel.models import build_model, save_checkpoint


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return build_model("tiny_bilstm").eval()


@pytest.fixture(scope="module")
def ckpt(model, tmp_path_factory) -> str:
    return save_checkpoint(model, str(tmp_path_factory.mktemp("ckpt") / "best"))


@pytest.fixture(scope="module")
def images(sample_dir) -> list[bytes]:
    return [sorted((sample_dir / "crops" / c).glob("*.jpeg"))[0].read_bytes() for c in CLASSES]


def _direct(model, images) -> np.ndarray:
    with torch.no_grad():
        x = torch.from_numpy(stack_bytes(images, model.cfg))
        return torch.softmax(model(x), dim=1).numpy()


def test_eager_matches_the_model(model, ckpt, images):
    p = Predictor(ckpt, device="cpu")
    assert p.classes == list(CLASSES) and p.backend == "eager"
    probs = p.predict_bytes(images)
    assert probs.shape == (len(images), len(CLASSES))
    np.testing.assert_allclose(probs.sum(axis=1), 1.0, atol=1e-5)
    np.testing.assert_allclose(probs, _direct(model, images), atol=1e-5)


def test_onnx_backend_matches_eager(ckpt, images):
    eager = Predictor(ckpt, device="cpu")
    onnx = Predictor(ckpt, device="cpu", backend="onnx", num_threads=1)
    x = stack_bytes(images, eager.cfg)
    for batch in (x[:1], x):  # the exported graph has a dynamic batch dimension
        np.testing.assert_allclose(onnx.logits_arrays(batch), eager.logits_arrays(batch), atol=ATOL)


def test_second_lane_gives_the_same_answers_on_half_the_threads(ckpt, images):
    import threading

    two = Predictor(ckpt, device="cpu", backend="onnx", num_threads=2, concurrent_batches=2)
    assert two.lanes == 2 and two._lane_forward.num_threads == 1
    assert two._forward.num_threads == 2
    x = stack_bytes(images, two.cfg)
    alone = two.predict_arrays(x)
    np.testing.assert_allclose(two.predict_arrays(x, concurrent=True), alone, atol=ATOL)
    # Two batches at once, one on each lane, as a serving replica runs them.
    out: dict[bool, np.ndarray] = {}
    ts = [
        threading.Thread(target=lambda c=c: out.__setitem__(c, two.predict_arrays(x, concurrent=c)))
        for c in (False, True)
    ]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    np.testing.assert_allclose(out[True], out[False], atol=ATOL)
    # No second lane where it cannot help: eager PyTorch, one thread, or not asked for.
    assert Predictor(ckpt, device="cpu", num_threads=2, concurrent_batches=2).lanes == 1
    assert Predictor(ckpt, "cpu", backend="onnx", num_threads=1, concurrent_batches=2).lanes == 1
    assert Predictor(ckpt, "cpu", backend="onnx", num_threads=2).lanes == 1


def test_auto_backend_picks_onnx_on_cpu(ckpt):
    assert Predictor(ckpt, device="cpu", backend="auto").backend == "onnx"


def test_onnx_check_refuses_a_mismatch(model):
    # A tolerance no float computation meets: the load-time check must say so.
    with pytest.raises(ExportError, match="differ from eager"):
        onnx_forward(model, model.cfg.input_size, atol=-1.0)
    assert len(export_onnx(model, model.cfg.input_size)) > 1000


def test_checkpoint_on_s3(model, s3_bucket, images):
    uri = save_checkpoint(model, f"{s3_bucket}/runs/x/best")
    np.testing.assert_allclose(
        Predictor(uri, "cpu").predict_bytes(images), _direct(model, images), atol=1e-5
    )


def test_bad_image_and_bad_backend(ckpt):
    p = Predictor(ckpt, device="cpu")
    with pytest.raises(ImageDecodeError) as e:
        p.predict_bytes([b"not an image"])
    assert e.value.reason == "not_an_image"
    with pytest.raises(ValueError, match="unknown backend"):
        Predictor(ckpt, device="cpu", backend="tensorrt")


def test_grey_images_deeper_than_8_bits_read_as_the_same_picture(images):
    """16-bit (full range or a 12-bit camera's) and float grey images decode to the 8-bit
    grey picture they hold, where Pillow's own conversion clips them to white or black."""
    import io

    from PIL import Image

    from cellmodel.data.transforms import decode_image

    level = np.asarray(Image.open(io.BytesIO(images[0])).convert("L"), dtype=np.uint16)
    want = np.repeat(level[..., None], 3, axis=2)
    for name, a, fmt in (
        ("16-bit PNG", level * 257, "PNG"),
        (
            "12 bits in a 16-bit TIFF",
            ((level.astype(int) * 4095 + 127) // 255).astype(np.uint16),
            "TIFF",
        ),
        ("float TIFF in [0, 1]", (level / 255.0).astype(np.float32), "TIFF"),
        ("float TIFF in [0, 255]", level.astype(np.float32), "TIFF"),
    ):
        buf = io.BytesIO()
        Image.fromarray(a).save(buf, fmt)
        got = np.asarray(decode_image(buf.getvalue()))
        assert got.shape == want.shape, name
        assert np.abs(got.astype(int) - want).max() <= 1, name
    # A flat 16-bit image of zeros stays black (nothing to scale), not an error.
    buf = io.BytesIO()
    Image.fromarray(np.zeros((8, 8), np.uint16)).save(buf, "PNG")
    assert np.asarray(decode_image(buf.getvalue())).max() == 0
