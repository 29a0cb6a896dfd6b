"""The Serve application under overload and faults, over real HTTP on 127.0.0.1.

Two applications run side by side on one local Ray (4 logical CPUs): ``faults`` (two
classifier replicas, room for 64 images in flight, a small per-request pixel budget) and
``tight`` (one classifier replica, room for one image in flight). The last test rewrites
``tight``'s checkpoint folder, so it stays last.
"""

from __future__ import annotations

import asyncio
import io
import os
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
from PIL import Image, ImageOps

from cellmodel import CLASSES
from cellmodel.models import CheckpointError, build_model, save_checkpoint

ROOT = Path(__file__).resolve().parents[1]
PIXEL_BUDGET = 200_000  # a bit over two 320x240 crops
MAX_IMAGES = 8


def _model(seed: int):
    torch.manual_seed(seed)
    return build_model("tiny_bilstm").eval()


def _crops(sample_dir: Path, n: int) -> list[bytes]:
    files = [sorted((sample_dir / "crops" / c).glob("*.jpeg"))[0] for c in CLASSES]
    return [f.read_bytes() for f in (files * n)[:n]]


def _encode(img: Image.Image, fmt: str, **kw) -> bytes:
    buf = io.BytesIO()
    img.save(buf, format=fmt, **kw)
    return buf.getvalue()


def _deploy(name: str, ckpt: str, *, replicas: int, **limits) -> None:
    from ray import serve

    from serve.app import Classifier, Ingress, pinned_meta
    from serve.settings import AppArgs

    args = AppArgs(checkpoint=ckpt, max_images_per_request=MAX_IMAGES, **limits)
    meta = pinned_meta(ckpt)
    classifier = Classifier.options(num_replicas=replicas).bind(
        ckpt, "auto", 1, weights_sha256=meta["weights_sha256"]
    )
    serve.run(Ingress.bind(classifier, args.model_dump(), meta), name=name, route_prefix=f"/{name}")


@pytest.fixture(scope="module")
def serve_url(ray_session, tmp_path_factory):
    from ray import serve

    port = free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    root = tmp_path_factory.mktemp("serve-faults")
    faults = save_checkpoint(_model(0), str(root / "faults"))
    tight = save_checkpoint(_model(0), str(root / "tight"))
    _deploy(
        "faults",
        faults,
        replicas=2,
        max_inflight_images=64,
        max_request_pixels=PIXEL_BUDGET,
        model_timeout_s=20,
    )
    _deploy("tight", tight, replicas=1, max_inflight_images=1, model_timeout_s=5)
    yield {"base": f"http://127.0.0.1:{port}", "tight_ckpt": tight}
    serve.shutdown()


@pytest.fixture(scope="module")
def url(serve_url) -> str:
    return serve_url["base"] + "/faults"


@pytest.fixture(scope="module")
def client(url):
    with httpx.Client(base_url=url, timeout=60) as c:
        yield c


def _probs(r: httpx.Response) -> np.ndarray:
    assert r.status_code == 200, r.text
    return np.array([r.json()["probabilities"][c] for c in CLASSES])


def _post(client, data: bytes, content_type: str) -> httpx.Response:
    return client.post("/v1/classify", content=data, headers={"content-type": content_type})


def _replica_pids(app: str, want: int, timeout_s: float = 60) -> set[int]:
    """PIDs of ``want`` running classifier replicas of ``app`` (asked through the handle)."""
    from ray import serve

    handle = serve.get_deployment_handle("Classifier", app_name=app)
    pids, deadline = set(), time.monotonic() + timeout_s
    while len(pids) < want and time.monotonic() < deadline:
        pids.add(handle.info.remote().result(timeout_s=30)["pid"])
    assert len(pids) >= want, pids
    return pids


# -- cost control -------------------------------------------------------------------------------


def test_exif_orientation_is_applied(client, sample_dir):
    upright = Image.open(io.BytesIO(_crops(sample_dir, 1)[0])).convert("RGB")
    # Stored turned a quarter to the left; EXIF orientation 6 says "turn right to display".
    stored = upright.transpose(Image.Transpose.ROTATE_90)
    exif = Image.Exif()
    exif[0x0112] = 6
    tagged = _encode(stored, "PNG", exif=exif)
    # Precondition: PIL's own reading of the tag gives back the upright pixels.
    assert np.array_equal(
        np.asarray(ImageOps.exif_transpose(Image.open(io.BytesIO(tagged)))), np.asarray(upright)
    )

    p_upright = _probs(_post(client, _encode(upright, "PNG"), "image/png"))
    p_tagged = _probs(_post(client, tagged, "image/png"))
    p_untagged = _probs(_post(client, _encode(stored, "PNG"), "image/png"))
    np.testing.assert_allclose(p_tagged, p_upright, atol=1e-6)
    assert np.abs(p_untagged - p_upright).max() > 1e-4  # the tag changed what the model saw

    # JPEG (draft-mode path): same tag, lossy pixels, so close rather than equal.
    p_jpeg = _probs(_post(client, _encode(stored, "JPEG", quality=98, exif=exif), "image/jpeg"))
    p_jpeg_upright = _probs(_post(client, _encode(upright, "JPEG", quality=98), "image/jpeg"))
    np.testing.assert_allclose(p_jpeg, p_jpeg_upright, atol=0.02)


def test_format_outside_allow_list_is_415(client, sample_dir):
    img = Image.open(io.BytesIO(_crops(sample_dir, 1)[0])).convert("RGB")
    gif = _encode(img, "GIF")
    for content_type in ("image/gif", "image/jpeg"):  # the bytes decide, not the label
        r = _post(client, gif, content_type)
        assert r.status_code == 415, r.text
        assert r.json()["error"]["reason"] == "unsupported_format"
        assert r.json()["error"]["format"] == "GIF"
    r = client.post(
        "/v1/classify/batch",
        files=[
            ("f", ("a.jpeg", _crops(sample_dir, 1)[0], "image/jpeg")),
            ("f", ("b.gif", gif, "image/gif")),
        ],
    )
    assert r.status_code == 415 and r.json()["error"]["index"] == 1, r.text
    for fmt, mt in (("WEBP", "image/webp"), ("TIFF", "image/tiff"), ("BMP", "image/bmp")):
        assert _post(client, _encode(img, fmt), mt).status_code == 200, fmt


def test_pixel_budget_per_request(client, sample_dir):
    crops = _crops(sample_dir, 3)  # 76,800 pixels each
    two = [("f", (f"{i}.jpeg", b, "image/jpeg")) for i, b in enumerate(crops[:2])]
    assert client.post("/v1/classify/batch", files=two).status_code == 200
    three = [("f", (f"{i}.jpeg", b, "image/jpeg")) for i, b in enumerate(crops)]
    r = client.post("/v1/classify/batch", files=three)
    assert r.status_code == 413, r.text
    err = r.json()["error"]
    assert err["reason"] == "pixel_budget" and err["limit_pixels"] == PIXEL_BUDGET
    assert err["pixels"] == 3 * 320 * 240

    # A 12-megapixel JPEG costs what draft mode decodes (1/8 scale: 500x375), so it fits the
    # budget; the same picture as a (smaller) PNG must be decoded whole and does not.
    big = Image.open(io.BytesIO(crops[0])).convert("RGB").resize((4000, 3000))
    assert _post(client, _encode(big, "JPEG", quality=80), "image/jpeg").status_code == 200
    r = _post(client, _encode(big.resize((1000, 750)), "PNG"), "image/png")
    assert r.status_code == 413 and r.json()["error"]["reason"] == "pixel_budget", r.text


def _odd_uploads(crop: bytes) -> dict[str, tuple[bytes, str, int]]:
    """Uploads a real client sends by mistake or by habit: (bytes, content type, status)."""
    rgb = Image.open(io.BytesIO(crop)).convert("RGB")
    frames = [rgb, rgb.rotate(90)]
    return {
        "cmyk_jpeg": (_encode(rgb.convert("CMYK"), "JPEG"), "image/jpeg", 200),
        "png_16bit": (_encode(rgb.convert("I;16"), "PNG"), "image/png", 200),
        "palette_png": (_encode(rgb.convert("P"), "PNG", transparency=0), "image/png", 200),
        "grey_alpha_png": (_encode(rgb.convert("LA"), "PNG"), "image/png", 200),
        "one_pixel": (_encode(rgb.resize((1, 1)), "PNG"), "image/png", 200),
        "animated_webp": (
            _encode(frames[0], "WEBP", save_all=True, append_images=frames[1:]),
            "image/webp",
            200,
        ),
        "multipage_tiff": (
            _encode(frames[0], "TIFF", save_all=True, append_images=frames[1:]),
            "image/tiff",
            200,
        ),
        "animated_gif": (
            _encode(frames[0], "GIF", save_all=True, append_images=frames[1:]),
            "image/gif",
            415,
        ),
        "zip": (b"PK\x03\x04" + bytes(100), "image/jpeg", 422),
        "html": (b"<!doctype html><html><body>cell</body></html>", "image/png", 422),
    }


@pytest.mark.parametrize("case", list(_odd_uploads(_encode(Image.new("RGB", (8, 8)), "PNG"))))
def test_odd_uploads_are_200_or_4xx(client, sample_dir, case):
    data, content_type, status = _odd_uploads(_crops(sample_dir, 1)[0])[case]
    r = _post(client, data, content_type)
    assert r.status_code == status, r.text


# -- OpenAPI ------------------------------------------------------------------------------------


def test_openapi_documents_bodies_and_errors(client):
    doc = client.get("/openapi.json").json()
    single = doc["paths"]["/v1/classify"]["post"]
    batch = doc["paths"]["/v1/classify/batch"]["post"]
    assert {"image/jpeg", "image/png", "multipart/form-data"} <= set(
        single["requestBody"]["content"]
    )
    assert {"multipart/form-data", "application/json"} <= set(batch["requestBody"]["content"])
    images = batch["requestBody"]["content"]["application/json"]["schema"]["properties"]["images"]
    assert images["maxItems"] == MAX_IMAGES  # this deployment's limit, not a default
    for op in (single, batch):
        assert {"200", "400", "413", "415", "422", "503"} <= set(op["responses"])
        assert "Retry-After" in op["responses"]["503"]["headers"]
        assert "$ref" in str(op["responses"]["415"]["content"]["application/json"]["schema"])
    assert client.get("/docs").status_code == 200


def test_schemathesis_all_checks_pass(url):
    """A schema-driven client (schemathesis, every check) against the running app."""
    cmd = [
        str(Path(sys.executable).with_name("schemathesis")),
        "--config-file",
        str(ROOT / "tests" / "schemathesis.toml"),
        "run",
        f"{url}/openapi.json",
        "--checks",
        "all",
        "--max-examples",
        "25",
        "--workers",
        "1",
        "--seed",
        "1",
        "--request-timeout",
        "60",
        "--generation-database",
        "none",  # no example database left in the working directory
        "--no-color",
    ]
    out = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    assert out.returncode == 0, out.stdout[-6000:] + out.stderr[-2000:]
    assert "No issues found" in out.stdout


# -- backpressure ---------------------------------------------------------------------------------


async def _load(url: str, body: bytes, concurrency: int, n: int) -> list[httpx.Response]:
    todo, out = iter(range(n)), []
    limits = httpx.Limits(max_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as c:

        async def worker() -> None:
            for _ in todo:
                out.append(
                    await c.post(
                        "/v1/classify", content=body, headers={"content-type": "image/jpeg"}
                    )
                )

        await asyncio.gather(*(worker() for _ in range(concurrency)))
    return out


def test_full_queue_answers_503_with_retry_after(serve_url, sample_dir):
    """``tight`` admits one image in flight: of 32 concurrent requests, those that find it
    busy are refused at once with 503 + Retry-After; the rest are answered."""
    rs = asyncio.run(_load(serve_url["base"] + "/tight", _crops(sample_dir, 1)[0], 32, 96))
    codes = [r.status_code for r in rs]
    assert set(codes) <= {200, 503}, codes
    assert codes.count(200) > 0 and codes.count(503) > 0, codes
    for r in rs:
        if r.status_code == 503:
            assert r.headers["retry-after"] == "1"
            assert r.json()["error"]["reason"] == "overloaded"
            assert r.headers["content-type"] == "application/json"


# -- faults ---------------------------------------------------------------------------------------


def test_killed_replica_under_load_never_500(url, client, sample_dir):
    """SIGKILL one of two classifier replicas while 8 clients keep sending: every answer is a
    200 (in-flight calls retried on the other replica) or a 503 with Retry-After, never a 500;
    and the service answers 200 again afterwards."""
    body = _crops(sample_dir, 1)[0]
    victim = min(_replica_pids("faults", 2))
    result: list[httpx.Response] = []
    loader = threading.Thread(target=lambda: result.extend(asyncio.run(_load(url, body, 8, 400))))
    loader.start()
    time.sleep(3)  # load under way
    os.kill(victim, signal.SIGKILL)
    loader.join(timeout=600)
    codes = [r.status_code for r in result]
    assert len(codes) == 400
    assert set(codes) <= {200, 503}, {c: codes.count(c) for c in set(codes)}
    assert codes.count(200) >= 300, {c: codes.count(c) for c in set(codes)}
    assert all(r.headers.get("retry-after") for r in result if r.status_code == 503)
    assert _post(client, body, "image/jpeg").status_code == 200


# -- the served model is the one named --------------------------------------------------------------


def test_build_app_refuses_weights_that_do_not_match_checkpoint_json(tmp_path):
    from serve.app import build_app
    from serve.settings import AppArgs

    save_checkpoint(_model(0), str(tmp_path / "a"))
    save_checkpoint(_model(1), str(tmp_path / "b"))
    # Weights replaced by hand (or a save caught half-way): checkpoint.json names others.
    (tmp_path / "a" / "model.safetensors").write_bytes(
        (tmp_path / "b" / "model.safetensors").read_bytes()
    )
    with pytest.raises(CheckpointError, match="refusing"):
        build_app(AppArgs(checkpoint=str(tmp_path / "a")))


def test_retrained_folder_is_refused_by_new_replicas(serve_url, sample_dir):
    """A retrain writes another model into the served folder, then the classifier replica
    dies: its replacement refuses the new weights (they are not the ones the application was
    built with), so the endpoint answers 503 + Retry-After instead of another model's
    answers under the old version, and /readyz says not ready."""
    from ray import serve

    base, ckpt = serve_url["base"] + "/tight", serve_url["tight_ckpt"]
    body = _crops(sample_dir, 1)[0]
    with httpx.Client(base_url=base, timeout=60) as c:
        before = c.post("/v1/classify", content=body, headers={"content-type": "image/jpeg"})
        assert before.status_code == 200
        version = before.json()["model"]["version"]
        save_checkpoint(_model(1), ckpt)  # the retrain
        (pid,) = _replica_pids("tight", 1)
        os.kill(pid, signal.SIGKILL)

        message, deadline = "", time.monotonic() + 240
        while "refusing to load" not in message and time.monotonic() < deadline:
            r = c.post("/v1/classify", content=body, headers={"content-type": "image/jpeg"})
            assert r.status_code in (200, 503), r.text
            if r.status_code == 200:  # only ever the pinned model
                assert r.json()["model"]["version"] == version
                np.testing.assert_allclose(_probs(r), _probs(before), atol=1e-6)
            else:
                assert r.headers["retry-after"]
            status = serve.status().applications["tight"].deployments["Classifier"]
            message = status.message or ""
            time.sleep(1)
        assert "refusing to load" in message, message
        r = c.post("/v1/classify", content=body, headers={"content-type": "image/jpeg"})
        assert r.status_code == 503 and r.headers["retry-after"], r.text
        assert c.get("/readyz").status_code == 503


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]
