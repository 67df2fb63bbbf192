from __future__ import annotations

import errno
import os
import shutil
import signal
import socket
import subprocess
import sys
import time

import polars as pl
import pytest
import torch
from typer.testing import CliRunner

from classify.cli import app
from classify.predict import PredictSettings, classify_dir
from classify.train import TrainSettings, train
from curator.core.errors import UsageError
from curator.core.images import iter_files, scan
from curator.core.paths import from_text
from tests.conftest import REPO, SAMPLE, tree_checksums, write_odd_tree


def test_one_row_per_file_with_the_loaders_reasons(tmp_path):
    root = tmp_path / "raw"
    expected = write_odd_tree(root)
    result = classify_dir(root, tmp_path / "p.parquet", PredictSettings(workers=1, batch_size=4, flush_every=8))
    df = pl.read_parquet(result.out)
    assert sorted(df["path"].to_list()) == sorted(expected)
    assert df["path"].n_unique() == df.height == len(expected) == result.files
    for row in df.iter_rows(named=True):
        status, fragment = expected[row["path"]]
        if status == "ok":
            assert row["error"] is None and row["predicted"] is not None, row
            assert len(row["pred_top_classes"]) == 5 and row["pred_top_scores"][0] == pytest.approx(row["confidence"])
            assert row["pred_top_scores"] == sorted(row["pred_top_scores"], reverse=True)
        else:
            assert fragment in row["error"] and row["predicted"] is None and row["pred_top_classes"] is None, row
    assert result.errors == sum(1 for s, _ in expected.values() if s != "ok")
    assert not (tmp_path / "p.parquet.parts").exists()


def test_imagenet_names_without_a_model(tmp_path):
    root = tmp_path / "photos"
    root.mkdir()
    for name in ("coffee.jpg", "chelsea.jpg"):
        shutil.copy(REPO / "tests" / "data" / name, root / name)
    df = pl.read_parquet(classify_dir(root, tmp_path / "p.parquet", PredictSettings(workers=0)).out)
    labels = dict(zip(df["path"], df["predicted"]))
    assert labels["coffee.jpg"] == "espresso"
    assert "cat" in labels["chelsea.jpg"]


def test_lazy_listing_matches_the_scan_order(tmp_path):
    root = tmp_path / "t"
    for rel in ("b/img10.jpg", "b/img2.jpg", "a.jpg", "a/x1.jpg", "A2/z.png", "c10/q.jpg", "c9/q.jpg"):
        (root / rel).parent.mkdir(parents=True, exist_ok=True)
        (root / rel).write_bytes(b"x")
    assert list(iter_files(root)) == scan(root)


KILL_SCRIPT = """
import sys
from classify.predict import PredictSettings, classify_dir
classify_dir(sys.argv[1], sys.argv[2], PredictSettings(workers=int(sys.argv[3]), batch_size=4, flush_every=8,
             resume=True, embeddings=True))
"""


@pytest.mark.slow  # over 25 s (pytest --durations, 2 busy cores)
@pytest.mark.parametrize("workers", [0, 2])
def test_sigkill_then_resume_equals_an_uninterrupted_run(tmp_path, workers):
    root = tmp_path / "paintings"
    for p in sorted(SAMPLE.rglob("*.jpg"))[::4]:
        (root / p.parent.name).mkdir(parents=True, exist_ok=True)
        shutil.copy(p, root / p.parent.name / p.name)
    (root / "Baroque" / "broken.jpg").write_bytes(b"\xff\xd8\xff" + b"\x00" * 50)
    n_files = len(scan(root))
    settings = PredictSettings(workers=0, batch_size=4, flush_every=8, embeddings=True)
    whole = pl.read_parquet(classify_dir(root, tmp_path / "whole.parquet", settings).out)
    out = tmp_path / "killed.parquet"
    parts = tmp_path / "killed.parquet.parts"
    script = tmp_path / "run.py"
    script.write_text(KILL_SCRIPT)
    proc = subprocess.Popen([sys.executable, str(script), str(root), str(out), str(workers)], cwd=REPO,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and len(list(parts.glob("part-*.parquet"))) < 2:
        time.sleep(0.05)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert not out.exists(), "the run finished before it could be killed"
    flushed = pl.concat([pl.read_parquet(p) for p in sorted(parts.glob("part-*.parquet"))])
    assert 0 < flushed.height < n_files and flushed.height % 8 == 0
    with pytest.raises(UsageError, match="interrupted run"):
        classify_dir(root, out, settings)
    resumed = classify_dir(root, out, PredictSettings(workers=workers, batch_size=4, flush_every=8, embeddings=True,
                                                      resume=True))
    assert resumed.resumed_rows == flushed.height
    final = pl.read_parquet(out)
    assert final.height == n_files and final["path"].n_unique() == n_files
    assert final.equals(whole)


def test_existing_output_is_an_error_not_an_overwrite(tmp_path, small_tree):
    out = tmp_path / "p.parquet"
    out.write_bytes(b"precious")
    with pytest.raises(UsageError, match="exists"):
        classify_dir(small_tree, out, PredictSettings(workers=0))
    assert out.read_bytes() == b"precious"
    with pytest.raises(UsageError, match="not a folder"):
        classify_dir(tmp_path / "nowhere", tmp_path / "q.parquet", PredictSettings(workers=0))


@pytest.mark.slow  # over 25 s (pytest --durations, 2 busy cores)
def test_model_checkpoint_class_names_and_embedding_width(sample_ws, small_tree, tmp_path):
    run = train(sample_ws / "splits.parquet", tmp_path / "run",
                TrainSettings(model="efficientnet_lite0", epochs=0, workers=0, probe_l2=(1e-2,), probe_steps=50))
    result = classify_dir(small_tree, tmp_path / "p.parquet",
                          PredictSettings(model=str(run.run_dir), workers=0, embeddings=True, top_k=3))
    df = pl.read_parquet(result.out)
    assert set(df["predicted"]) <= set(run.classes)
    assert all(len(t) == 3 and set(t) <= set(run.classes) for t in df["pred_top_classes"])
    assert {len(e) for e in df["embedding"]} == {2304}
    # a trained model gets most of the sample's own paintings right
    truth = [p.split("/")[0] for p in df["path"]]
    assert sum(a == b for a, b in zip(truth, df["predicted"])) >= 6


def test_cli_dir(small_tree, tmp_path):
    runner = CliRunner()
    out = tmp_path / "cli.parquet"
    res = runner.invoke(app, ["dir", str(small_tree), "--out", str(out), "--workers", "0", "--top-k", "2"])
    assert res.exit_code == 0, res.output
    assert pl.read_parquet(out).height == 8 and "predictions" in res.output
    assert "model waited" in res.output and "bound" in res.output  # what limited the run
    res = runner.invoke(app, ["dir", str(small_tree), "--out", str(out), "--workers", "0"])
    assert res.exit_code == 2 and "exists" in res.output and "Traceback" not in res.output


def dict_rows(meta, probs, feats, positions, classes, name, k, embeddings):
    """The rows as the committed code built them before issue 15: one Python dict per row."""
    rows = []
    where = {int(pos): j for j, pos in enumerate(positions)}
    for i, ((text, escaped), err) in enumerate(meta):
        row = {"path": text, "path_escaped": escaped, "predicted": None, "confidence": None, "pred_top_classes": None,
               "pred_top_scores": None, "error": err, "model": name}
        if embeddings:
            row["embedding"] = None
        if i in where:
            p = probs[where[i]]
            top = int(p.argmax())
            scores, idx = torch.from_numpy(p).topk(k)
            row.update(predicted=classes[top], confidence=float(p[top]), pred_top_classes=[classes[c] for c in idx],
                       pred_top_scores=scores.tolist())
            if embeddings:
                row["embedding"] = feats[where[i]].tolist()
        rows.append(row)
    return rows


def test_rows_are_arrow_arrays_equal_to_a_dict_per_row(odd_tree):
    """Rows come out of numpy as Arrow arrays (labels as indices into the class names, top-k and embeddings as
    fixed-size lists), with the schema and values the dict-per-row builder gave, errors included."""
    import pyarrow as pa

    from classify.predict import (
        Chunks,
        DirWork,
        DoneSet,
        Inputs,
        Predictor,
        RowBuilder,
        launch,
        output_schema,
    )
    from curator.core.images import ReadPolicy
    from curator.core.runtime import select_runtime
    from curator.embedding.dataplane import DataPlane

    root, _ = odd_tree
    predictor = Predictor(PredictSettings()).to(torch.device("cpu"))
    runtime = select_runtime("cpu", "fp32")
    work = DirWork(root, ReadPolicy(root), predictor.preprocess)
    plane = DataPlane(Chunks(Inputs(root, root.parent / "p.parquet", False), DoneSet(), 8), work,
                      predictor.shape)
    builder = RowBuilder(predictor.classes, predictor.name, 4, True, predictor.embedding_width)
    tables, expected = [], []
    for ready in plane:
        probs, feats = predictor(ready.pixels, runtime)
        expected += dict_rows(ready.meta, probs.numpy(), feats.numpy(), ready.positions, predictor.classes,
                              predictor.name, 4, True)
        tables.append(builder(launch(predictor, ready, runtime, 4, True)))
    table = pa.Table.from_batches(tables)
    assert table.schema == output_schema(True)
    assert table.schema.field("predicted").type == pa.string()
    assert table.schema.field("pred_top_classes").type == pa.list_(pa.string())
    assert table.schema.field("embedding").type == pa.list_(pa.float32())
    assert table.num_rows == len(expected) == 20 and table.column("error").null_count == 11
    assert table.equals(pa.Table.from_pylist(expected, schema=output_schema(True)))


@pytest.mark.slow  # over 25 s (pytest --durations, 2 busy cores)
def test_gpu_decode_path_on_the_cpu_gives_the_same_rows(odd_tree, tmp_path):
    """`gpu_decode=True` on a CPU runs the device JPEG path with decode_batch(device="cpu"): the same rows, errors
    included, the same top-1 labels and near-equal confidences."""
    root, expected = odd_tree
    cpu = classify_dir(root, tmp_path / "cpu.parquet", PredictSettings(workers=1, batch_size=4, gpu_decode=False))
    dev = classify_dir(root, tmp_path / "dev.parquet", PredictSettings(workers=1, batch_size=4, gpu_decode=True))
    assert cpu.device_jpegs == 0 and dev.device_jpegs >= 4  # the plain and the rotated JPEGs
    a, b = pl.read_parquet(cpu.out), pl.read_parquet(dev.out)
    assert a.select("path", "path_escaped", "error", "model").equals(b.select("path", "path_escaped", "error", "model"))
    assert a["predicted"].to_list() == b["predicted"].to_list() and a["predicted"].null_count() == 9
    assert (a["confidence"] - b["confidence"]).abs().max() < 0.05


def test_a_small_folder_starts_no_worker_processes_and_says_what_bound_it(small_tree, tmp_path):
    result = classify_dir(small_tree, tmp_path / "p.parquet")
    assert result.workers == 0 and result.batch_size == 64 and result.files == 8
    assert 0 <= result.wait_seconds <= result.seconds and result.bound in ("decoding", "model")


def test_cuda_asked_for_without_a_gpu_is_a_clear_error(small_tree, tmp_path):
    import torch

    if torch.cuda.is_available():
        pytest.skip("this machine has CUDA")
    with pytest.raises(UsageError, match="no CUDA device"):
        classify_dir(small_tree, tmp_path / "p.parquet", PredictSettings(device="cuda", workers=0))
    assert not (tmp_path / "p.parquet").exists() and not (tmp_path / "p.parquet.parts").exists()


# --- issue 14: messy folders, foreign files, mixed runs, bad input ----------------------------------------------

MARKER_TEXT = b"SECRET-MARKER-123"


class Interrupted(Exception):
    """Raised from the events callback to stop a run after its first flush, as a kill would."""


def stop_after_first_part(parts):
    def events(kind, info):
        if kind == "advance" and any(parts.glob("part-*.parquet")):
            raise Interrupted

    return events


def interrupted_run(root, out, settings):
    """Start a run and stop it once a part is flushed; returns the parts folder."""
    with pytest.raises(Interrupted):
        classify_dir(root, out, settings, stop_after_first_part(out.with_name(out.name + ".parts")))
    return out.with_name(out.name + ".parts")


def assert_one_line_error(output: str, fragment: str) -> None:
    """The output ends with exactly one `error:` line holding `fragment`, and has no traceback."""
    assert "Traceback" not in output, output
    lines = [line for line in output.splitlines() if line.strip()]
    assert sum("error:" in line for line in lines) == 1 and "error:" in lines[-1], output
    assert fragment in lines[-1], output


def copy_paintings(root, n):
    root.mkdir(parents=True, exist_ok=True)
    for p in sorted(SAMPLE.rglob("*.jpg"))[:n]:
        shutil.copy(p, root / p.name)
    return root


def test_the_done_set_holds_digests_and_chunks_skip_what_it_holds(tmp_path):
    """Resume's bookkeeping: 16 bytes a path in one array (shared by forked workers), the escaped flag part of the
    key, and the listing skips exactly the done files, in listing order."""
    from classify.predict import Chunks, DoneSet, Inputs
    from curator.core.paths import relative_text

    done = DoneSet([("a/x.jpg", False), ("b/\\xff.jpg", True), ("a/x.jpg", False)])
    assert len(done) == 2 and done.digests.nbytes == 32
    assert done.contains([("a/x.jpg", False), ("a/x.jpg", True), ("b/\\xff.jpg", True), ("c.jpg", False)]).tolist() \
        == [True, False, True, False]
    assert DoneSet().contains([("a/x.jpg", False)]).tolist() == [False] and len(DoneSet.union([])) == 0
    assert len(DoneSet.union([done, DoneSet([("c.jpg", False)])])) == 3
    root = tmp_path / "tree"
    for i in range(30):
        (root / f"d{i % 3}").mkdir(parents=True, exist_ok=True)
        (root / f"d{i % 3}" / f"{i:02d}.jpg").write_bytes(b"x")
    inputs = Inputs(root, tmp_path / "out.parquet", False)
    listed = list(inputs)
    half = DoneSet(relative_text(p, root) for p in listed[::2])
    batches = list(Chunks(inputs, half, 4)())
    assert [p for b in batches for p in b] == listed[1::2] and all(len(b) <= 4 for b in batches)
    assert [p for b in Chunks(inputs, DoneSet(), 4)() for p in b] == listed


def test_non_utf8_names_are_rows_and_resume_reads_them_back(tmp_path):
    root = copy_paintings(tmp_path / "raw", 3)
    painting = sorted(SAMPLE.rglob("*.jpg"))[5].read_bytes()
    raw_name = os.path.join(os.fsencode(str(root)), b"0caf\xe9.jpg")
    fd = os.open(raw_name, os.O_WRONLY | os.O_CREAT, 0o644)
    os.write(fd, painting)
    os.close(fd)
    (root / "0caf\\xe9.jpg").write_bytes(painting)  # a valid name that reads like the escaped one
    settings = PredictSettings(workers=0, batch_size=2, flush_every=2)
    out = tmp_path / "p.parquet"
    parts = interrupted_run(root, out, settings)
    first = pl.read_parquet(sorted(parts.glob("part-*.parquet"))[0])
    assert sorted(zip(first["path"], first["path_escaped"])) == [("0caf\\xe9.jpg", False), ("0caf\\xe9.jpg", True)]
    resumed = classify_dir(root, out, PredictSettings(workers=0, batch_size=2, flush_every=2, resume=True))
    assert resumed.resumed_rows == 2 and resumed.files == 5
    again = classify_dir(root, out, PredictSettings(workers=0, batch_size=2, flush_every=2, resume=True))
    assert again.model == "already complete"
    df = pl.read_parquet(out)
    on_disk = sorted(os.listdir(root))
    assert sorted(from_text(p, e) for p, e in zip(df["path"], df["path_escaped"])) == on_disk
    assert df.height == 5 and df["error"].null_count() == 5
    assert df.filter(pl.col("path_escaped"))["path"].to_list() == ["0caf\\xe9.jpg"]


@pytest.fixture(scope="module")
def hostile_tree(tmp_path_factory):
    """A folder with a FIFO, a socket, a link to /dev/zero, a 16 GiB sparse video, an oversized image, links inside
    and outside, an outside folder link and a non-UTF-8 name; `outside` holds files carrying MARKER_TEXT."""
    base = tmp_path_factory.mktemp("hostile")
    root = copy_paintings(base / "raw" / "Baroque", 3).parent
    outside = base / "outside"
    outside.mkdir()
    (outside / "secret.jpg").write_bytes(MARKER_TEXT + b" is in this text file under an image name\n")
    (outside / "secret.png").write_bytes(b"\x89PNG\r\n\x1a\n" + MARKER_TEXT * 20)
    first = sorted(os.listdir(root / "Baroque"))[0]
    os.symlink(outside / "secret.jpg", root / "link.jpg")
    os.symlink(outside / "secret.png", root / "link.png")
    os.symlink(outside, root / "elsewhere")
    os.symlink(f"Baroque/{first}", root / "inside.jpg")
    os.symlink("/dev/zero", root / "zero.jpg")
    os.mkfifo(root / "fifo.jpg")
    sock = socket.socket(socket.AF_UNIX)
    sock.bind(str(root / "sock.jpg"))
    sock.close()
    with open(root / "video.mp4", "wb") as fh:
        fh.truncate(16 << 30)
    with open(root / "huge.png", "wb") as fh:
        fh.write(b"\x89PNG\r\n\x1a\n")
        fh.truncate(11_000_000)
    fd = os.open(os.path.join(os.fsencode(str(root)), b"caf\xe9.jpg"), os.O_WRONLY | os.O_CREAT, 0o644)
    os.write(fd, (root / "Baroque" / first).read_bytes())
    os.close(fd)
    return root, outside


def run_cli(args, timeout=60):
    """`classify ARGS` in a subprocess, so that a hang fails the test instead of stopping the suite."""
    proc = subprocess.run([sys.executable, "-m", "classify.cli", *map(str, args)], cwd=REPO, capture_output=True,
                          timeout=timeout)
    return proc.returncode, proc.stdout + proc.stderr


@pytest.fixture(scope="module")
def hostile_run(hostile_tree, tmp_path_factory):
    root, _ = hostile_tree
    out = tmp_path_factory.mktemp("hostile-out") / "p.parquet"
    code, output = run_cli(["dir", root, "--out", out, "--workers", "1", "--max-bytes", 10_000_000])
    assert code == 0, output
    return pl.read_parquet(out), out, output


def errors_by_path(df):
    return dict(zip(df["path"], df["error"]))


@pytest.mark.slow
def test_fifos_sockets_devices_and_big_files_become_rows_without_being_read(hostile_run):
    df, _, _ = hostile_run
    assert df["path"].n_unique() == df.height == 13
    errors = errors_by_path(df)
    assert "FIFO" in errors["fifo.jpg"] and "socket" in errors["sock.jpg"]
    assert "/dev/zero" in errors["zero.jpg"] and "not followed" in errors["zero.jpg"]
    assert errors["video.mp4"] == "not an image file (.mp4)"
    assert errors["huge.png"] == "too large: 11,000,000 bytes exceeds --max-bytes 10,000,000"
    assert all(errors[p] is None for p in df["path"] if p.startswith("Baroque/"))
    assert errors["caf\\xe9.jpg"] is None and df.filter(pl.col("path_escaped"))["path"].to_list() == ["caf\\xe9.jpg"]


@pytest.mark.slow
def test_links_leaving_the_folder_are_not_read_and_leak_nothing(hostile_run, hostile_tree):
    df, out, output = hostile_run
    _, outside = hostile_tree
    errors = errors_by_path(df)
    for name, target in (("link.jpg", "secret.jpg"), ("link.png", "secret.png"), ("elsewhere", "")):
        assert f"symbolic link to {outside / target}".rstrip("/") in errors[name], errors[name]
        assert "outside the scanned folder: not followed" in errors[name]
    assert errors["inside.jpg"] is None and df.filter(pl.col("path") == "inside.jpg")["predicted"][0] is not None
    written = [p for p in out.parent.rglob("*") if p.is_file()]
    assert written == [out]  # the parts folder is gone
    assert MARKER_TEXT not in out.read_bytes() and MARKER_TEXT not in output


@pytest.mark.slow
def test_follow_symlinks_reads_outside_links_and_still_never_hangs(hostile_tree, tmp_path):
    root, _ = hostile_tree
    out = tmp_path / "followed.parquet"
    code, output = run_cli(["dir", root, "--out", out, "--workers", "0", "--follow-symlinks"])
    assert code == 0, output
    errors = errors_by_path(pl.read_parquet(out))
    assert errors["zero.jpg"] == "not a regular file: a character device"
    assert errors["huge.png"] is not None and "too large" not in errors["huge.png"]  # under the default 1 GiB
    assert "SECRET-MARKER" in errors["link.jpg"]  # read when asked: the leak test above can fail
    assert "elsewhere/secret.jpg" in errors


def test_a_users_parts_folder_is_refused_and_left_untouched(small_tree, tmp_path):
    out = tmp_path / "p.parquet"
    parts = tmp_path / "p.parquet.parts"
    (parts / "mine").mkdir(parents=True)
    (parts / "notes.txt").write_text("my notes")
    (parts / "part-000000.parquet").write_bytes(b"not atelier's")
    (parts / "mine" / "photo.jpg").write_bytes(b"\xff\xd8\xff mine")
    before = tree_checksums(tmp_path)
    for extra in ([], ["--resume"]):
        res = CliRunner().invoke(app, ["dir", str(small_tree), "--out", str(out), "--workers", "0", *extra])
        assert res.exit_code == 2
        assert_one_line_error(res.output, "already holds files that atelier did not write")
        assert tree_checksums(tmp_path) == before and not out.exists()


def test_an_output_atelier_did_not_write_is_refused_even_with_resume(small_tree, tmp_path):
    precious = tmp_path / "precious.parquet"
    precious.write_bytes(b"precious")
    users = tmp_path / "users.parquet"
    pl.DataFrame({"path": ["a.jpg"], "label": ["mine"]}).write_parquet(users)
    before = tree_checksums(tmp_path)
    for out in (precious, users):
        res = CliRunner().invoke(app, ["dir", str(small_tree), "--out", str(out), "--workers", "0", "--resume"])
        assert res.exit_code == 2
        assert_one_line_error(res.output, "exists and was not written by `classify dir`")
    assert tree_checksums(tmp_path) == before


def test_cleanup_removes_only_atelier_files_from_the_parts_folder(small_tree, tmp_path):
    out = tmp_path / "p.parquet"
    settings = PredictSettings(workers=0, batch_size=2, flush_every=2)
    parts = interrupted_run(small_tree, out, settings)
    assert (parts / ".atelier").is_file() and (parts / "fingerprint.json").is_file()
    (parts / "mine.txt").write_text("dropped here by the user")
    result = classify_dir(small_tree, out, PredictSettings(workers=0, batch_size=2, flush_every=2, resume=True))
    assert result.files == pl.read_parquet(out).height == 8
    assert sorted(os.listdir(parts)) == ["mine.txt"] and (parts / "mine.txt").read_text() == "dropped here by the user"


@pytest.mark.slow  # over 25 s (pytest --durations, 2 busy cores)
def test_out_inside_the_folder_excludes_exactly_its_own_files(small_tree, tmp_path):
    (small_tree / "notes.txt").write_text("a user's file")
    inputs = sorted(p.relative_to(small_tree).as_posix() for p in scan(small_tree))
    out = small_tree / "preds.parquet"
    settings = PredictSettings(workers=0, batch_size=2, flush_every=2)
    interrupted_run(small_tree, out, settings)
    (small_tree / ".preds.parquet.k2j4h5g6.tmp").write_bytes(b"a temporary file of a killed join")
    classify_dir(small_tree, out, PredictSettings(workers=0, batch_size=2, flush_every=2, resume=True))
    assert sorted(pl.read_parquet(out)["path"]) == inputs and len(inputs) == 9
    # another run writing into a class folder still classifies that folder (and sees the first output as a file)
    nested = small_tree / "Baroque" / "more.parquet"
    df = pl.read_parquet(classify_dir(small_tree, nested, PredictSettings(workers=0)).out)
    assert sorted(df["path"]) == sorted(inputs + ["preds.parquet", ".preds.parquet.k2j4h5g6.tmp"])
    assert df.filter(pl.col("path").str.starts_with("Baroque/"))["predicted"].null_count() == 0


def test_resume_refuses_the_parts_of_another_run(small_tree, tmp_path):
    out = tmp_path / "p.parquet"
    base = dict(workers=0, batch_size=2, flush_every=2)
    parts = interrupted_run(small_tree, out, PredictSettings(**base))
    fake_run = tmp_path / "run"
    fake_run.mkdir()
    (fake_run / "model.safetensors").write_bytes(b"weights")
    other_root = tmp_path / "other"
    shutil.copytree(small_tree, other_root)
    before = tree_checksums(tmp_path)
    for change, word in ((dict(top_k=3), "top_k"), (dict(embeddings=True), "embeddings"),
                         (dict(model=str(fake_run)), "model"), (dict(backbone="efficientnet_lite2"), "model"),
                         (dict(max_bytes=1000), "max_bytes"), (dict(root=other_root), "root")):
        root = change.pop("root", small_tree)
        with pytest.raises(UsageError, match=f"made by another run \\(different {word}\\)") as info:
            classify_dir(root, out, PredictSettings(**base, **change, resume=True))
        assert "\n" not in str(info.value)
    assert tree_checksums(tmp_path) == before
    res = CliRunner().invoke(app, ["dir", str(small_tree), "--out", str(out), "--workers", "0", "--batch-size", "2",
                                   "--resume", "--top-k", "2"])
    assert res.exit_code == 2
    assert_one_line_error(res.output, "different top_k")
    classify_dir(small_tree, out, PredictSettings(**base, resume=True))
    df = pl.read_parquet(out)
    assert df.height == 8 and df["model"].n_unique() == 1 and not parts.exists()
    with pytest.raises(UsageError, match="different embeddings"):  # a finished output is checked the same way
        classify_dir(small_tree, out, PredictSettings(**base, embeddings=True, resume=True))


@pytest.mark.parametrize("case", ["batch-size 0", "workers -1", "top-k 0", "top-k -2", "max-bytes 0", "out folder",
                                  "out under a file", "dir missing", "dir a file"])
def test_bad_input_is_one_line_and_exit_2(case, small_tree, tmp_path):
    (tmp_path / "a-file").write_text("x")
    (tmp_path / "a-folder").mkdir()
    target = {"out folder": tmp_path / "a-folder", "out under a file": tmp_path / "a-file" / "p.parquet"}
    root = {"dir missing": tmp_path / "nowhere", "dir a file": tmp_path / "a-file"}.get(case, small_tree)
    option = {"batch-size 0": ["--batch-size", "0"], "workers -1": ["--workers", "-1"],
              "top-k 0": ["--top-k", "0"], "top-k -2": ["--top-k", "-2"], "max-bytes 0": ["--max-bytes", "0"]}
    args = ["dir", str(root), "--out", str(target.get(case, tmp_path / "p.parquet")), *option.get(case, [])]
    before = tree_checksums(tmp_path)
    res = CliRunner().invoke(app, args)
    assert res.exit_code == 2, res.output
    fragment = {"batch-size 0": "--batch-size must be at least 1", "workers -1": "--workers must be 0",
                "top-k 0": "--top-k", "top-k -2": "--top-k", "max-bytes 0": "--max-bytes must be a positive",
                "out folder": "is a folder; give a file name", "out under a file": "is a file, not a folder",
                "dir missing": "is not a folder (it does not exist)",
                "dir a file": "is not a folder (it is a file)"}[case]
    assert_one_line_error(res.output, fragment)
    assert tree_checksums(tmp_path) == before


@pytest.mark.skipif(os.geteuid() == 0, reason="root ignores file permissions")
def test_a_read_only_output_folder_is_one_line(small_tree, tmp_path):
    folder = tmp_path / "locked"
    folder.mkdir()
    folder.chmod(0o555)
    try:
        res = CliRunner().invoke(app, ["dir", str(small_tree), "--out", str(folder / "p.parquet"), "--workers", "0"])
    finally:
        folder.chmod(0o755)
    assert res.exit_code == 2
    assert_one_line_error(res.output, "is not writable")
    assert os.listdir(folder) == []


def test_a_full_disk_while_flushing_is_one_line_and_resumable(small_tree, tmp_path, monkeypatch):
    import classify.predict as predict

    def full(table, path):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC), str(path))

    real = predict._write_atomic_table
    monkeypatch.setattr(predict, "_write_atomic_table", full)
    out = tmp_path / "p.parquet"
    res = CliRunner().invoke(app, ["dir", str(small_tree), "--out", str(out), "--workers", "0"])
    assert res.exit_code == 2
    assert_one_line_error(res.output, "No space left on device; the rows flushed so far are kept")
    assert not out.exists()
    monkeypatch.setattr(predict, "_write_atomic_table", real)
    res = CliRunner().invoke(app, ["dir", str(small_tree), "--out", str(out), "--workers", "0", "--resume"])
    assert res.exit_code == 0, res.output
    assert pl.read_parquet(out).height == 8


def test_files_and_parts_of_the_previous_release_are_read_in_this_releases_names(small_tree, tmp_path):
    """One vocabulary: `predicted`/`pred_*` for the prediction, `label` only for a given label. A predictions file
    of the previous release (`label`, `topk_labels`, `topk_scores`) reads in the new names, an interrupted run of
    the previous release finishes under them, and an eval file's `label` (the true class) is left alone."""
    from dataclasses import replace

    from classify.predict import (
        claim_parts,
        fingerprint,
        parts_folder,
        read_predictions,
        write_part,
    )

    settings = PredictSettings(workers=0, batch_size=4, flush_every=4, top_k=3)
    whole = read_predictions(classify_dir(small_tree, tmp_path / "whole.parquet", settings).out)
    assert whole.columns[:6] == ["path", "path_escaped", "predicted", "confidence", "pred_top_classes",
                                 "pred_top_scores"] and whole["predicted"].null_count() == 0
    old = whole.rename({"predicted": "label", "pred_top_classes": "topk_labels", "pred_top_scores": "topk_scores"})
    old.write_parquet(tmp_path / "old.parquet")
    assert read_predictions(tmp_path / "old.parquet").equals(whole)

    out = tmp_path / "resumed.parquet"
    claim_parts(parts_folder(out), fingerprint(small_tree, settings))
    write_part(old.head(4).to_arrow(), parts_folder(out) / "part-000000.parquet")
    resumed = classify_dir(small_tree, out, replace(settings, resume=True))
    assert resumed.resumed_rows == 4 and resumed.files == whole.height
    assert read_predictions(out).equals(whole) and pl.read_parquet(out).columns == whole.columns

    evaluated = pl.DataFrame({"label": ["Baroque"], "predicted": ["Rococo"], "pred_top_classes": [["Rococo"]]})
    evaluated.write_parquet(tmp_path / "eval.parquet")
    assert read_predictions(tmp_path / "eval.parquet").equals(evaluated)


@pytest.mark.parametrize("bad", [{"top_k": 0}, {"batch_size": 0}, {"workers": -1}, {"max_bytes": 0},
                                 {"batch_size": 4, "flush_every": 6}])
def test_a_bad_setting_is_a_usage_error(bad):
    """Settings errors are one type (`UsageError`, exit 2) whether they come from the CLI or the library."""
    with pytest.raises(UsageError):
        PredictSettings(**bad)
