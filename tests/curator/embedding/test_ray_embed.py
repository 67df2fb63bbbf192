"""`curator clean --engine ray`: the embedding pass on Ray Data gives the local engine's manifest and embeddings.

The Ray tests share one local Ray (2 CPUs, no dashboard) started by a module fixture and shut down after; they are
skipped with a reason where the ray extra is not installed. The checks of options, plans and the missing extra run
without starting Ray.
"""

from __future__ import annotations

import importlib.util
import os
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import numpy as np
import polars as pl
import pytest
from typer.testing import CliRunner

from curator.cli import app
from curator.core.errors import UsageError
from curator.embedding.backbones import load_backbone
from curator.embedding.embed import cache_for
from curator.embedding.ray_embed import (
    INSTALL_HINT,
    Cluster,
    DecodeBatch,
    Plan,
    RayEmbedder,
    RaySettings,
    engine_settings,
    plan_pool,
    put_shards,
    require_ray,
    run_pipeline,
)
from curator.stages.clean import CleanSettings, clean
from tests.conftest import REPO, SAMPLE, write_odd_tree

needs_ray = pytest.mark.skipif(importlib.util.find_spec("ray") is None,
                               reason="the ray extra is not installed (pip install 'atelier[ray]')")


def one_line_error(result, code: int = 2) -> str:
    """The CLI's message, checked: exit `code`, one line, no traceback."""
    assert result.exit_code == code, result.output
    assert "Traceback" not in result.output
    lines = [line for line in result.output.splitlines() if line.strip()]
    assert len(lines) == 1, result.output
    return lines[0]


# --- without starting Ray ---------------------------------------------------------------------------------------


def test_without_the_extra_engine_ray_says_how_to_install_it(monkeypatch, small_tree, tmp_path):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` now raises ImportError, as without the extra
    with pytest.raises(UsageError, match=r"pip install 'atelier\[ray\]'"):
        require_ray()
    result = CliRunner().invoke(app, ["clean", str(small_tree), "--out", str(tmp_path / "ws"), "--engine", "ray"])
    assert one_line_error(result) == f"error: {INSTALL_HINT}"
    assert not (tmp_path / "ws").exists()


def test_no_module_imports_ray_until_the_engine_runs():
    code = ("import sys, curator.cli, classify.cli, curator.stages.clean, curator.embedding.ray_embed, classify.predict, "
            "classify.ray_engine; print('ray' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "False"


@pytest.mark.parametrize("args, fragment", [
    (["--engine", "spark"], "unknown --engine 'spark'"),
    (["--address", "auto"], "--address is for --engine ray"),
    (["--concurrency", "2", "--num-gpus-per-worker", "1"], "--num-gpus-per-worker, --concurrency are for --engine"),
])
def test_engine_options_are_checked_before_anything_is_written(args, fragment, small_tree, tmp_path):
    result = CliRunner().invoke(app, ["clean", str(small_tree), "--out", str(tmp_path / "ws"), *args])
    assert fragment in one_line_error(result)
    assert not (tmp_path / "ws").exists()


@needs_ray
@pytest.mark.parametrize("args, fragment", [
    (["--address", "not an address"], "--address must be auto, ray://HOST:PORT or HOST:PORT"),
    (["--concurrency", "0"], "--concurrency must be at least 1"),
    (["--num-gpus-per-worker", "-1"], "--num-gpus-per-worker must be 0 or more"),
    (["--num-gpus-per-worker", "nan"], "--num-gpus-per-worker must be 0 or more"),
    (["--workers", "2"], "leave --workers out"),
])
def test_bad_ray_options_are_one_line_exit_2(args, fragment, small_tree, tmp_path):
    result = CliRunner().invoke(app, ["clean", str(small_tree), "--out", str(tmp_path / "ws"), "--engine", "ray",
                                      *args])
    assert fragment in one_line_error(result)
    assert not (tmp_path / "ws").exists()


def test_the_actor_pool_follows_the_cluster():
    gpus = Cluster(cpus=64, gpus=8)
    assert plan_pool(gpus, RaySettings(), "auto") == plan_pool(gpus, RaySettings(), "cuda")
    assert (plan_pool(gpus, RaySettings(), "auto").concurrency, plan_pool(gpus, RaySettings(), "auto").num_gpus) \
        == (8, 1.0)
    assert plan_pool(gpus, RaySettings(num_gpus_per_worker=0.5), "auto").concurrency == 16
    assert plan_pool(gpus, RaySettings(), "cpu").device == "cpu"
    cpus = plan_pool(Cluster(cpus=16, gpus=0), RaySettings(), "auto")
    assert (cpus.concurrency, cpus.num_gpus, cpus.device) == (8, 0.0, "cpu")
    assert plan_pool(Cluster(cpus=2, gpus=0), RaySettings(), "auto").concurrency == 1


@pytest.mark.parametrize("cluster, settings, device, fragment", [
    (Cluster(16, 0), RaySettings(num_gpus_per_worker=1), "auto", "the Ray cluster has 0 GPUs"),
    (Cluster(16, 0), RaySettings(), "cuda", "--num-gpus-per-worker 0"),
    (Cluster(16, 2), RaySettings(concurrency=3), "auto", "needs 3 GPUs; the Ray cluster has 2"),
    (Cluster(16, 2), RaySettings(num_gpus_per_worker=1), "cpu", "contradict each other"),
    (Cluster(2, 0), RaySettings(concurrency=2), "auto", "leave none of the cluster's 2 CPUs for decoding"),
])
def test_a_pool_that_could_never_be_scheduled_is_refused(cluster, settings, device, fragment):
    with pytest.raises(UsageError, match=fragment) as info:
        plan_pool(cluster, settings, device)
    assert "\n" not in str(info.value)


def test_ray_options_are_validated_in_one_line():
    for kwargs in ({"address": "x y"}, {"concurrency": 0}, {"num_gpus_per_worker": float("inf")}):
        with pytest.raises(UsageError) as info:
            RaySettings(**kwargs)
        assert "\n" not in str(info.value)
    for address in ("auto", "ray://head:10001", "10.0.0.1:6379", "head-node.local:6379"):
        assert RaySettings(address=address).address == address
    assert engine_settings("local") is None


# --- on a local Ray ---------------------------------------------------------------------------------------------


@needs_ray
def test_a_failure_on_the_cluster_is_one_line(local_ray):
    from curator.core.errors import AtelierError
    from curator.embedding.ray_embed import ray_errors

    @local_ray.remote(max_retries=0)
    def refuse():
        raise UsageError("--dtype bf16: this CPU has no native bf16")

    @local_ray.remote(max_retries=0)
    def crash():
        raise MemoryError("out of memory\nwith a second line")

    with pytest.raises(UsageError, match="^--dtype bf16: this CPU has no native bf16$"):
        with ray_errors("the pass", "rerun"):
            local_ray.get(refuse.remote())
    with pytest.raises(AtelierError) as info:
        with ray_errors("the pass", "the shards so far are kept"):
            local_ray.get(crash.remote())
    assert str(info.value) == ("the pass failed on the Ray cluster: MemoryError: out of memory; the shards so far "
                               "are kept")
    # through Ray Data: a decode task that raises
    refs, _ = put_shards(local_ray, [[{"key": 0, "path": b"/nowhere.jpg"}]])
    with pytest.raises(UsageError, match="^--max-bytes must be at least 1$"):
        with ray_errors("the pass", "rerun"):
            list(run_pipeline(local_ray, refs, DecodeBatch(refusing_work, (3, 8, 8)), _Echo, (), Plan(1, 0.0, "cpu"),
                              1, "numpy"))


def refusing_work(path, ctx):
    """A per-file work that refuses, as a node might (a task's error must reach the user as one line)."""
    raise UsageError("--max-bytes must be at least 1")


class _Echo:
    def __call__(self, batch):
        return batch


def sample_with_damage(root: Path, every: int = 1) -> Path:
    """data/sample (every `every`-th painting), the safe loader's odd files, and a byte-identical copy."""
    write_odd_tree(root)
    for p in sorted(SAMPLE.rglob("*.jpg"))[::every]:
        (root / p.parent.name).mkdir(parents=True, exist_ok=True)
        shutil.copy(p, root / p.parent.name / p.name)
    first = sorted(SAMPLE.rglob("*.jpg"))[0]
    shutil.copy(first, root / first.parent.name / f"copy_of_{first.name}")
    return root


#: manifest columns compared exactly (the later stages run on the driver, on the gathered arrays)
EXACT = ["path", "path_escaped", "label", "sha256", "bytes", "width", "height", "format", "status", "reason", "keep",
         "pixel_sha256", "phash", "dhash", "crop_phash", "colour", "cluster", "is_exact_issue", "is_phash_issue",
         "is_embedding_issue"]


def embedded(manifest: pl.DataFrame) -> list[str]:
    """The sha256 of every row the embedding pass gave features (all but corrupt and ignored files)."""
    shas = manifest.filter(~pl.col("status").is_in(["corrupt", "ignored"]))["sha256"]
    return shas.unique(maintain_order=True).to_list()


@needs_ray
@pytest.mark.slow
def test_clean_on_ray_equals_the_local_engine(local_ray, tmp_path):
    root = sample_with_damage(tmp_path / "raw")
    local = clean(CleanSettings(root=root, workspace=tmp_path / "local", workers=0))
    result = CliRunner().invoke(app, ["clean", str(root), "--out", str(tmp_path / "ray"), "--engine", "ray",
                                      "--concurrency", "1"])
    assert result.exit_code == 0, result.output
    assert "engine ray: the embedding pass ran on 1 model actors (0 GPU each), cpu float32" in result.output
    ray_manifest = pl.read_parquet(tmp_path / "ray" / "manifest.parquet")
    columns = [c for c in EXACT if c in local.manifest.columns]
    assert ray_manifest.select(columns).equals(local.manifest.select(columns))
    assert (ray_manifest["status"] == "corrupt").sum() >= 6 and (ray_manifest["status"] == "duplicate").sum() >= 1
    shas = embedded(local.manifest)
    assert len(shas) > 100
    backbone = load_backbone("efficientnet_lite0")
    here, there = (cache_for(tmp_path / ws, backbone).get(shas) for ws in ("local", "ray"))
    assert np.allclose(here, there, rtol=2e-3, atol=2e-3)  # both caches hold float16


def actor_pids(name: str) -> list[int]:
    """Processes of this machine whose title names a Ray Data actor running `name`."""
    pids = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                title = Path(f"/proc/{entry}/cmdline").read_bytes()
            except OSError:
                continue
            if f"MapBatches({name})".encode() in title:
                pids.append(int(entry))
    return pids


def kill_when(condition, name: str, killed: list[int], timeout: float = 300) -> threading.Thread:
    """A thread that SIGKILLs the first actor process running `name` once `condition()` holds."""

    def run() -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            pids = actor_pids(name) if condition() else []
            if pids:
                os.kill(pids[0], signal.SIGKILL)
                killed.append(pids[0])
                return
            time.sleep(0.05)

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    return thread


@needs_ray
@pytest.mark.slow
def test_an_actor_killed_mid_pass_still_gives_every_file_one_row(local_ray, tmp_path):
    root = sample_with_damage(tmp_path / "raw", every=3)
    local = clean(CleanSettings(root=root, workspace=tmp_path / "local", workers=0, batch_size=4))
    backbone = load_backbone("efficientnet_lite0")
    ws = tmp_path / "ray"
    cached = lambda: (ws / "cache" / "embeddings").is_dir() and any(  # noqa: E731
        f.stat().st_size > 0 for f in (ws / "cache" / "embeddings").glob("*.emb"))
    killed: list[int] = []
    watcher = kill_when(cached, "_EmbedActor", killed)
    try:
        result = clean(CleanSettings(root=root, workspace=ws, batch_size=4),
                       embedder=RayEmbedder(RaySettings(concurrency=1)))
    except Exception as exc:  # noqa: BLE001 - Ray gave up on the task: a rerun computes what the cache lacks
        assert "\n" not in str(exc), exc
        result = clean(CleanSettings(root=root, workspace=ws, batch_size=4),
                       embedder=RayEmbedder(RaySettings(concurrency=1)))
    watcher.join(1)
    assert killed, "no actor was killed: the pass ended before the watcher saw the first cached batch"
    assert result.manifest["path"].to_list() == local.manifest["path"].to_list()
    assert result.manifest["status"].to_list() == local.manifest["status"].to_list()
    shas = embedded(local.manifest)
    here, there = (cache_for(w, backbone).get(shas) for w in (tmp_path / "local", ws))
    assert np.allclose(here, there, rtol=2e-3, atol=2e-3)
