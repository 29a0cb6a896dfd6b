"""The Serve application over real HTTP on 127.0.0.1, with a checkpoint on the test S3 server."""

from __future__ import annotations

import asyncio
import base64
import io
import json
import socket
import struct
import time
import zlib
from pathlib import Path

import httpx
import numpy as np
import pytest
import torch
import yaml
from PIL import Image as PILImage

from cellmodel import CLASSES
from cellmodel.data.transforms import stack_bytes
from cellmodel.infer.predictor import Predictor
from cellmodel.models import CheckpointError, build_model, save_checkpoint

ROOT = Path(__file__).resolve().parents[1]
BODY_LIMIT = 1 << 20
MAX_IMAGES = 8


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _sample(sample_dir: Path, per_class: int) -> list[tuple[str, bytes]]:
    return [
        (p.name, p.read_bytes())
        for c in CLASSES
        for p in sorted((sample_dir / "crops" / c).glob("*.jpeg"))[:per_class]
    ]


def _trained_tiny(sample_dir: Path):
    """tiny_bilstm with its head fitted to the sample's features (random body), so that its
    predictions differ from image to image; training the whole net would cost minutes here."""
    torch.manual_seed(0)
    model = build_model("tiny_bilstm").eval()
    items = _sample(sample_dir, 12)
    with torch.no_grad():
        feats = model.forward_features(
            torch.from_numpy(stack_bytes([b for _, b in items], model.cfg))
        )
    y = torch.tensor([i // 12 for i in range(len(items))])
    opt = torch.optim.Adam(model.fc.parameters(), lr=0.05)
    for _ in range(300):
        opt.zero_grad()
        torch.nn.functional.cross_entropy(model.fc(feats), y).backward()
        opt.step()
    return model


@pytest.fixture(scope="module")
def checkpoint(ray_session, s3_server, sample_dir) -> str:
    import s3fs

    bucket = f"serve-{_free_port()}"
    s3fs.S3FileSystem(endpoint_url=s3_server, skip_instance_cache=True).mkdir(bucket)
    uri = f"s3://{bucket}/runs/tiny/best"
    save_checkpoint(_trained_tiny(sample_dir), uri, metrics={"val_loss": 1.23, "val_acc": 0.5})
    return uri


@pytest.fixture(scope="module")
def url(checkpoint) -> str:
    from ray import serve

    from serve.app import build_app
    from serve.settings import AppArgs

    port = _free_port()
    serve.start(http_options={"host": "127.0.0.1", "port": port})
    # Room for the 64 concurrent requests below (the default admits 48 images in flight).
    args = AppArgs(
        checkpoint=checkpoint,
        max_body_bytes=BODY_LIMIT,
        max_images_per_request=MAX_IMAGES,
        max_inflight_images=128,
    )
    serve.run(build_app(args), name="cellmodel", route_prefix="/")
    yield f"http://127.0.0.1:{port}"
    serve.shutdown()


@pytest.fixture(scope="module")
def client(url):
    with httpx.Client(base_url=url, timeout=60) as c:
        yield c


@pytest.fixture(scope="module")
def direct(checkpoint, sample_dir):
    """Probabilities from the model called directly, per sample file name."""
    items = _sample(sample_dir, 6)
    probs = Predictor(checkpoint, device="cpu").predict_bytes([b for _, b in items])
    return items, dict(zip([n for n, _ in items], probs))


def _jpeg(item) -> dict:
    return {"content": item[1], "headers": {"content-type": "image/jpeg"}}


def _check(result: dict, expected: np.ndarray) -> None:
    assert result["class"] == CLASSES[int(expected.argmax())]
    got = np.array([result["probabilities"][c] for c in CLASSES])
    np.testing.assert_allclose(got, expected, atol=1e-5)


def _assert_still_serving(client, item) -> None:
    r = client.post("/v1/classify", **_jpeg(item))
    assert r.status_code == 200, r.text


# -- health, model ----------------------------------------------------------------------------


def test_health_and_readiness(client):
    assert client.get("/healthz").json() == {"status": "ok"}
    r = client.get("/readyz")
    assert r.status_code == 200 and r.json()["status"] == "ready"
    assert r.json()["model"]["name"] == "tiny_bilstm"


def test_model_route_reports_checkpoint(client, checkpoint):
    m = client.get("/v1/model").json()
    assert m["name"] == "tiny_bilstm"
    assert m["classes"] == list(CLASSES)
    assert m["input_size"] == [3, 120, 160]
    assert m["metrics"] == {"val_loss": 1.23, "val_acc": 0.5}
    assert m["checkpoint"] == checkpoint and len(m["version"]) == 12
    batching = {"max_batch_size": 16, "batch_wait_timeout_s": 0.005, "concurrent_batches": 2}
    assert m["batching"] == batching
    # One CPU, so one thread: no second lane (the fused test below has two).
    assert m["lanes"] == 1
    # backend auto: the fastest exact backend timed at start; answers match eager (tests below)
    timings = m["backend_timings_ms"]
    assert "eager" in timings and m["backend"] == min(timings, key=timings.get)
    assert m["version"] == m["weights_sha256"][:12] and m["tta"] is False


def test_openapi_lists_routes(client):
    assert client.get("/docs").status_code == 200
    paths = client.get("/openapi.json").json()["paths"]
    assert {"/v1/classify", "/v1/classify/batch", "/healthz", "/readyz", "/v1/model"} <= set(paths)


# -- correct answers ----------------------------------------------------------------------------


def test_single_matches_direct_model(client, direct):
    items, expected = direct
    assert len({int(p.argmax()) for p in expected.values()}) > 1, "model predicts one class only"
    for item in items[::3]:
        r = client.post("/v1/classify", **_jpeg(item))
        assert r.status_code == 200, r.text
        _check(r.json(), expected[item[0]])
        assert r.json()["model"]["name"] == "tiny_bilstm"
    # The same image as a multipart upload.
    r = client.post("/v1/classify", files={"file": (items[0][0], items[0][1], "image/jpeg")})
    assert r.status_code == 200, r.text
    _check(r.json(), expected[items[0][0]])


_FORM = "application/x-www-form-urlencoded"


def test_raw_image_bodies_as_common_clients_send_them(client, direct):
    """A JPEG body sent the way everyday clients send bytes is classified as if sent as
    image/jpeg: no Content-Type (Python's requests with data=bytes), application/octet-stream
    (SDKs), and a form's type (curl --data-binary, wget --post-file)."""
    items, expected = direct
    name, data = items[1]
    for headers in ({}, {"content-type": "application/octet-stream"},
                    {"content-type": _FORM}):  # fmt: skip
        for route in ("/v1/classify", "/v1/classify/batch"):
            r = client.post(route, content=data, headers=headers)
            assert r.status_code == 200, (headers, route, r.text)
            _check(r.json()["results"][0] if route.endswith("batch") else r.json(), expected[name])
    # JSON, with or without its type, on both routes: {"image": b64} or {"images": [b64]}
    b64 = base64.b64encode(data).decode()
    for doc in ({"image": b64}, {"images": [b64]}):
        for headers in ({}, {"content-type": "application/json"}):
            for route in ("/v1/classify", "/v1/classify/batch"):
                r = client.post(route, content=json.dumps(doc).encode(), headers=headers)
                assert r.status_code == 200, (doc.keys(), headers, route, r.text)
                res = r.json()["results"][0] if route.endswith("batch") else r.json()
                _check(res, expected[name])
                if route.endswith("batch"):
                    assert res["filename"] == ("image" if "image" in doc else "images[0]")
    r = client.post("/v1/classify", json={"images": [b64, b64]})
    assert r.status_code == 400 and r.json()["error"]["reason"] == "wrong_image_count", r.text
    r = client.post("/v1/classify", json={"image": "%%%"})
    assert r.status_code == 400 and r.json()["error"]["message"] == "image is not valid base64"
    # a GIF keeps its own answer whichever way it comes: the bytes decide the format
    gif = io.BytesIO()
    PILImage.new("RGB", (8, 8)).save(gif, "GIF")
    r = client.post("/v1/classify", content=gif.getvalue(), headers={"content-type": _FORM})
    assert r.status_code == 415 and r.json()["error"]["reason"] == "unsupported_format", r.text


def test_batch_keeps_order(client, direct):
    items, expected = direct
    chosen = [items[i] for i in np.random.default_rng(1).permutation(len(items))[:MAX_IMAGES]]
    files = [("files", (n, b, "image/jpeg")) for n, b in chosen]
    r = client.post("/v1/classify/batch", files=files)
    assert r.status_code == 200, r.text
    results = r.json()["results"]
    assert [x["filename"] for x in results] == [n for n, _ in chosen]
    assert [x["index"] for x in results] == list(range(len(chosen)))
    for res, (n, _) in zip(results, chosen):
        _check(res, expected[n])
    # JSON with base64 images gives the same answers.
    body = {"images": [base64.b64encode(b).decode() for _, b in chosen[:3]]}
    r = client.post("/v1/classify/batch", json=body)
    assert r.status_code == 200, r.text
    for res, (n, _) in zip(r.json()["results"], chosen[:3]):
        _check(res, expected[n])
    # As clients write base64: a browser's data URL, the `base64` command's 76-column lines,
    # the URL-safe alphabet without padding: the same answers.
    b64 = base64.b64encode(chosen[0][1]).decode()
    forms = ["data:image/jpeg;base64," + b64,
             "\n".join(b64[i : i + 76] for i in range(0, len(b64), 76)) + "\n",
             base64.urlsafe_b64encode(chosen[0][1]).decode().rstrip("=")]  # fmt: skip
    r = client.post("/v1/classify/batch", json={"images": forms})
    assert r.status_code == 200, r.text
    for res in r.json()["results"]:
        _check(res, expected[chosen[0][0]])


def test_a_grayscale_image_is_answered_with_a_warning(client, direct):
    """An image without colour is classified (the caller decides) but marked: the model reads
    the stain's colours. Colour crops carry no warning, alone or beside it in a batch."""
    import io

    from PIL import Image

    items, _ = direct
    grey = io.BytesIO()
    Image.open(io.BytesIO(items[0][1])).convert("L").save(grey, "JPEG", quality=90)
    r = client.post("/v1/classify", content=grey.getvalue(), headers={"content-type": "image/jpeg"})
    assert r.status_code == 200, r.text
    assert r.json()["warnings"] == ["grayscale"]
    files = [("files", ("colour.jpg", items[1][1], "image/jpeg")),
             ("files", ("grey.jpg", grey.getvalue(), "image/jpeg"))]  # fmt: skip
    results = client.post("/v1/classify/batch", files=files).json()["results"]
    assert [x["warnings"] for x in results] == [[], ["grayscale"]]
    for item in items:  # every sample crop has colour
        assert client.post("/v1/classify", **_jpeg(item)).json()["warnings"] == []
    # A scientific camera's 16-bit grey PNG (full range, or 12 bits in 16) is read as the same
    # picture in 8 bits, not clipped to white: the same answer as the 8-bit grey PNG.
    level = np.asarray(Image.open(grey).convert("L"), dtype=np.uint16)
    answers = []
    twelve = ((level.astype(int) * 4095 + 127) // 255).astype(np.uint16)
    for a in (level.astype(np.uint8), level * 257, twelve):
        buf = io.BytesIO()
        Image.fromarray(a).save(buf, "PNG")
        r = client.post(
            "/v1/classify", content=buf.getvalue(), headers={"content-type": "image/png"}
        )
        assert r.status_code == 200, r.text
        answers.append(r.json())
    assert all(x["warnings"] == ["grayscale"] for x in answers)
    first = np.array([answers[0]["probabilities"][c] for c in CLASSES])
    for other in answers[1:]:
        assert other["class"] == answers[0]["class"]
        got = np.array([other["probabilities"][c] for c in CLASSES])
        np.testing.assert_allclose(got, first, atol=0.02)


def test_an_image_under_half_the_model_input_is_answered_with_a_warning(client, direct):
    """A crop the model must enlarge more than twice (either way round) is classified but
    marked ``low_resolution``; half the input exactly, or a portrait crop, is not."""
    import io

    from PIL import Image

    items, _ = direct
    _, h, w = client.get("/v1/model").json()["input_size"]
    colour = Image.open(io.BytesIO(items[0][1])).convert("RGB")
    cases = {(w // 2, h // 2): [], (h // 2, w // 2): [], (w // 2 - 1, h // 2): ["low_resolution"],
             (w // 2, h // 2 - 1): ["low_resolution"], (w, h): []}  # fmt: skip
    files = []
    for cw, ch in cases:
        buf = io.BytesIO()
        colour.resize((cw, ch)).save(buf, "PNG")
        files.append(("files", (f"{cw}x{ch}.png", buf.getvalue(), "image/png")))
    r = client.post("/v1/classify/batch", files=files)
    assert r.status_code == 200, r.text
    got = {x["filename"]: x["warnings"] for x in r.json()["results"]}
    assert got == {f"{cw}x{ch}.png": want for (cw, ch), want in cases.items()}
    one = io.BytesIO()
    colour.resize((1, 1)).save(one, "PNG")
    r = client.post("/v1/classify", content=one.getvalue(), headers={"content-type": "image/png"})
    assert r.status_code == 200 and "low_resolution" in r.json()["warnings"], r.text


def test_64_concurrent_requests(url, direct):
    """64 clients at once: every answer is a 200 or a 503 (the ingress's bounded queue),
    and a client that retries as told gets every answer right."""
    items, expected = direct
    picks = [items[i % len(items)] for i in range(64)]

    async def one(c, it):
        for _ in range(20):
            r = await c.post("/v1/classify", **_jpeg(it))
            if r.status_code != 503:
                return r
            # The app's own 503s carry Retry-After; Serve's queue-full 503 may not (1 s then).
            await asyncio.sleep(min(float(r.headers.get("retry-after", 1)), 1.0))
        return r

    async def run():
        limits = httpx.Limits(max_connections=64)
        async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as c:
            return await asyncio.gather(*(one(c, it) for it in picks))

    responses = asyncio.run(run())
    refused = [(r.status_code, r.text[:200]) for r in responses if r.status_code != 200]
    assert not refused, refused
    for r, (n, _) in zip(responses, picks):
        _check(r.json(), expected[n])


# -- bad input ------------------------------------------------------------------------------------


def _png_bomb(side: int = 20000) -> bytes:
    """A valid 1-bit PNG of side x side pixels of one colour: tiny file, huge when decoded."""

    def chunk(kind: bytes, data: bytes) -> bytes:
        return (
            struct.pack(">I", len(data)) + kind + data + struct.pack(">I", zlib.crc32(kind + data))
        )

    z, row = zlib.compressobj(9), b"\x00" * (1 + (side + 7) // 8)
    idat = b"".join(z.compress(row) for _ in range(side)) + z.flush()
    ihdr = struct.pack(">IIBBBBB", side, side, 1, 0, 0, 0, 0)
    return b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", ihdr) + chunk(b"IDAT", idat) + chunk(b"IEND", b"")


def _bad_requests(good: bytes) -> dict:
    img = {"content-type": "image/jpeg"}
    return {
        "empty": ("/v1/classify", {"content": b"", "headers": img}, 400, "empty"),
        "not_an_image": (
            "/v1/classify",
            {"content": b"hello, not an image" * 10, "headers": img},
            422,
            "not_an_image",
        ),
        "truncated": (
            "/v1/classify",
            {"content": good[: len(good) // 2], "headers": img},
            422,
            "truncated",
        ),
        "bomb": (
            "/v1/classify",
            {"content": _png_bomb(), "headers": {"content-type": "image/png"}},
            413,
            "too_large",
        ),
        "content_type": (
            "/v1/classify",
            {"content": good, "headers": {"content-type": "text/plain"}},
            415,
            "unsupported_media_type",
        ),
        # Without a Content-Type or as a form (curl --data-binary), the bytes decide.
        "no_content_type_not_an_image": (
            "/v1/classify",
            {"content": b"hello"},
            422,
            "not_an_image",
        ),
        "form_that_is_a_form": (
            "/v1/classify",
            {"content": b"a=1&b=2", "headers": {"content-type": _FORM}},
            415,
            "unsupported_media_type",
        ),
        "two_images_single_route": (
            "/v1/classify",
            {"files": [("f", ("a.jpeg", good, "image/jpeg"))] * 2},
            400,
            "wrong_image_count",
        ),
        "too_many": (
            "/v1/classify/batch",
            {"files": [("f", ("a.jpeg", good, "image/jpeg"))] * (MAX_IMAGES + 1)},
            413,
            "too_many_images",
        ),
        "no_images": (
            "/v1/classify/batch",
            {"data": {"note": "x"}, "files": {}},
            415,
            "unsupported_media_type",
        ),
        "bad_item_in_batch": (
            "/v1/classify/batch",
            {
                "files": [
                    ("f", ("a.jpeg", good, "image/jpeg")),
                    ("f", ("b.jpeg", b"junk", "image/jpeg")),
                ]
            },
            422,
            "not_an_image",
        ),
        "bad_base64": ("/v1/classify/batch", {"json": {"images": ["%%%"]}}, 400, "bad_base64"),
        "data_url_without_base64": (
            "/v1/classify/batch",
            {"json": {"images": ["data:image/jpeg,%FF%D8"]}},
            400,
            "bad_base64",
        ),
        "bad_json": (
            "/v1/classify/batch",
            {"content": b"{", "headers": {"content-type": "application/json"}},
            400,
            "bad_json",
        ),
        "body_too_large": (
            "/v1/classify",
            {"content": good + b"\0" * BODY_LIMIT, "headers": img},
            413,
            "body_too_large",
        ),
        # No Content-Length: the limit is enforced while the body streams in.
        "body_too_large_chunked": (
            "/v1/classify",
            {"content": iter([good] + [b"\0" * 65536] * 20), "headers": img},
            413,
            "body_too_large",
        ),
    }


BAD = list(_bad_requests(b"").keys())


@pytest.mark.parametrize("case", BAD)
def test_bad_input_is_a_4xx_and_service_keeps_serving(client, direct, case):
    items, _ = direct
    route, kwargs, status, reason = _bad_requests(items[0][1])[case]
    r = client.post(route, **kwargs)
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["reason"] == reason and err["message"]
    if case == "bad_item_in_batch":
        assert err["index"] == 1 and err["filename"] == "b.jpeg"
    if case == "form_that_is_a_form":  # what to send instead, for the client that sent it
        assert "--data-binary @cell.jpg -H 'Content-Type: image/jpeg'" in err["message"]
    _assert_still_serving(client, items[0])


def test_wrong_path_or_method_gets_the_same_json_error_and_what_to_use(client, direct):
    r = client.get("/v1/classify")
    assert r.status_code == 405 and r.headers["allow"] == "POST", r.text
    err = r.json()["error"]
    assert err["reason"] == "method_not_allowed"
    assert err["message"] == "GET is not accepted on /v1/classify; use POST (see /docs)"
    r = client.post("/v1/clasify", content=b"x", headers={"content-type": "image/jpeg"})
    assert r.status_code == 404 and r.json()["error"]["reason"] == "not_found", r.text
    assert "POST /v1/classify, POST /v1/classify/batch" in r.json()["error"]["message"]
    _assert_still_serving(client, direct[0][0])


# -- metrics ----------------------------------------------------------------------------------


def test_metrics_endpoint_has_app_counters(client, direct, ray_session):
    items, _ = direct
    client.post("/v1/classify", **_jpeg(items[0]))
    client.post("/v1/classify", content=b"", headers={"content-type": "image/jpeg"})
    port = ray_session.nodes()[0]["MetricsExportPort"]
    checks = {
        "predictions by class": lambda ln: "cellmodel_predictions" in ln and 'class_name="' in ln,
        "the empty image refused": lambda ln: (
            "cellmodel_rejected_inputs" in ln and 'reason="empty"' in ln
        ),
        "Serve's own": lambda ln: ln.startswith("ray_serve_num_http_requests"),
    }
    missing, deadline = list(checks), time.monotonic() + 90
    while missing and time.monotonic() < deadline:  # metrics are pushed every few seconds
        lines = httpx.get(f"http://127.0.0.1:{port}/metrics", timeout=10).text.splitlines()
        missing = [name for name, ok in checks.items() if not any(map(ok, lines))]
        if missing:
            time.sleep(2)
    assert not missing, f"not exported within 90 s: {missing}"


def test_user_config_changes_batching_in_place(client, checkpoint, direct):
    from ray import serve

    from serve.app import Classifier, Ingress
    from serve.settings import AppArgs, BatchConfig

    args = AppArgs(
        checkpoint=checkpoint, max_body_bytes=BODY_LIMIT, max_images_per_request=MAX_IMAGES
    )
    batching = {"max_batch_size": 4, "batch_wait_timeout_s": 0.001}
    classifier = Classifier.options(user_config=batching).bind(checkpoint, args.backend, None)
    serve.run(Ingress.bind(classifier, args.model_dump()), name="cellmodel", route_prefix="/")
    expected = {**BatchConfig().model_dump(), **batching}
    assert client.get("/v1/model").json()["batching"] == expected
    _assert_still_serving(client, direct[0][0])


def test_fused_layout_serves_the_same_answers(client, checkpoint, direct):
    """The model inside the ingress (serve/config-cpu.yaml): the same answers, concurrent
    requests batched on two lanes, batching set by the Ingress's own user_config."""
    from ray import serve

    from serve.app import Ingress, build_app
    from serve.settings import AppArgs, BatchConfig

    args = AppArgs(checkpoint=checkpoint, layout="fused", backend="onnx", torch_threads=2)
    items, probs = direct

    async def post_all():
        async with httpx.AsyncClient(base_url=client.base_url, timeout=60) as c:
            return await asyncio.gather(
                *(c.post("/fused/v1/classify", **_jpeg(it)) for it in items)
            )

    serve.run(build_app(args), name="fused", route_prefix="/fused")
    assert "Classifier" not in serve.status().applications["fused"].deployments
    info = client.get("/fused/v1/model").json()
    assert info["lanes"] == 2 and info["backend"] == "onnx"
    assert info["batching"] == BatchConfig().model_dump()
    assert client.get("/fused/readyz").json()["status"] == "ready"
    # All at once (under the proxy's limit of 40 in flight): batches on both lanes.
    for it, r in zip(items, asyncio.run(post_all())):
        assert r.status_code == 200, r.text
        _check(r.json(), probs[it[0]])

    batching = {"max_batch_size": 2, "batch_wait_timeout_s": 0.0, "concurrent_batches": 1}
    fused = Ingress.options(user_config=batching).bind(None, args.model_dump())
    serve.run(fused, name="fused", route_prefix="/fused")
    assert client.get("/fused/v1/model").json()["batching"] == batching
    assert all(r.status_code == 200 for r in asyncio.run(post_all()))
    serve.delete("fused")


def test_a_model_that_reads_the_window_around_the_cell_is_served_as_it_predicts(
    client, tmp_path, sample_dir
):
    """A checkpoint with ``frame`` set: the endpoint frames each upload on its white cell as
    the model's own decode does, so its answers are the direct model's, not the whole
    picture's."""
    from ray import serve

    from serve.app import build_app
    from serve.settings import AppArgs

    torch.manual_seed(1)
    model = build_model("tiny_bilstm", frame=0.5).eval()
    ck = str(tmp_path / "framed")
    save_checkpoint(model, ck)
    items = _sample(sample_dir, 2)
    want = Predictor(ck, device="cpu").predict_bytes([b for _, b in items])
    whole = model.cfg.preprocessing() | {"frame": 0.0}
    with torch.no_grad():
        x = torch.from_numpy(stack_bytes([b for _, b in items], whole))
        unframed = torch.softmax(model(x), -1).numpy()
    assert np.abs(unframed - want).max() > 1e-3  # the window is not the whole picture
    serve.run(build_app(AppArgs(checkpoint=ck, layout="fused")), name="fr", route_prefix="/fr")
    for it, p in zip(items, want):
        r = client.post("/fr/v1/classify", **_jpeg(it))
        assert r.status_code == 200, r.text
        _check(r.json(), p)
    serve.delete("fr")


# -- builder, config, manifest (no HTTP) ---------------------------------------------------------


def test_build_app_refuses_a_missing_checkpoint(tmp_path):
    from serve.app import build_app
    from serve.settings import AppArgs

    with pytest.raises(CheckpointError, match="checkpoint.json is missing"):
        build_app(AppArgs(checkpoint=str(tmp_path / "nothing")))


def test_config_yaml_is_a_valid_serve_config():
    from ray.serve.schema import ServeDeploySchema

    from serve.app import Classifier, Ingress
    from serve.settings import AppArgs, BatchConfig

    cfg = yaml.safe_load((ROOT / "serve" / "config.yaml").read_text())
    schema = (
        ServeDeploySchema.model_validate(cfg)
        if hasattr(ServeDeploySchema, "model_validate")
        else ServeDeploySchema.parse_obj(cfg)
    )
    (app,) = schema.applications
    assert cfg["http_options"]["host"] == "127.0.0.1"
    AppArgs.model_validate(app.args)
    deps = {d["name"]: d for d in cfg["applications"][0]["deployments"]}
    assert set(deps) == {Classifier.name, Ingress.name}
    BatchConfig.model_validate(deps["Classifier"]["user_config"])
    assert deps["Classifier"]["autoscaling_config"]["max_replicas"] > 1


def test_cpu_config_yaml_is_a_valid_fused_serve_config():
    from ray.serve.schema import ServeDeploySchema

    from serve.app import Ingress
    from serve.settings import AppArgs, BatchConfig

    cfg = yaml.safe_load((ROOT / "serve" / "config-cpu.yaml").read_text())
    (app,) = ServeDeploySchema.model_validate(cfg).applications
    assert AppArgs.model_validate(app.args).layout == "fused"
    (dep,) = cfg["applications"][0]["deployments"]  # the Ingress alone holds the model
    assert dep["name"] == Ingress.name
    assert BatchConfig.model_validate(dep["user_config"]).concurrent_batches == 2
    assert dep["ray_actor_options"]["num_cpus"] == app.args["torch_threads"]


def test_rayservice_manifest_is_generated_from_config():
    from serve import manifest

    text = (ROOT / "infra" / "rayservice.yaml").read_text()
    cfg = manifest.load_config()
    assert text == manifest.render(cfg), "stale: run `python -m serve.manifest`"
    embedded = manifest.embedded_config(text)
    assert embedded["applications"] == cfg["applications"]
    assert embedded["http_options"]["host"] == "0.0.0.0"
    workers = yaml.safe_load(text)["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    (container,) = workers[0]["template"]["spec"]["containers"]
    assert container["readinessProbe"]["httpGet"] == {"path": "/readyz", "port": 8000}
    assert manifest.main(["--check"]) == 0


def test_manifest_check_fails_on_stale_file(tmp_path, capsys):
    from serve import manifest

    stale = tmp_path / "rayservice.yaml"
    stale.write_text("kind: RayService\n")
    assert manifest.main(["--check", "--out", str(stale)]) == 1
    assert "stale" in capsys.readouterr().err
    assert manifest.main(["--config", str(tmp_path / "missing.yaml")]) == 2
