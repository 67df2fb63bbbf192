"""`classify serve` under load: requests/s and latency at 1, 8 and 32 concurrent clients, micro-batching on vs off.

Each mode is a real `classify serve` process on 127.0.0.1 (a free port), both running from the start: micro-batching
with `--max-batch B`, and one-at-a-time inference with `--max-batch 1`. For each number of concurrent clients, that
many httpx async clients POST the sample paintings to /predict, one file per request, back to back, until
`--requests` have been answered or `--seconds` have passed (bounded in count and in time); a few requests first warm
the server up. Each level runs `--repeats` times per mode, the modes alternating (and swapping which goes first), and
the median run is kept, so that a machine whose load drifts favours neither. Non-200 answers and transport errors
are counted as errors. The server's own batching counters (/model) give the mean batch of each run, and its CPU
seconds (/proc) and this process's (the clients') give the CPU each request cost on each side. The table and the
ratios (batched / one at a time) are printed, with the load average before and after (`uptime`: this bench is only
as quiet as the machine), and written to bench/out/serve.json.

Then, with both servers stopped, the model's own cost (`model_costs`): the served engine (as `classify serve` loads
it, batch norms folded) in this process with one torch thread, CPU milliseconds per image for the decode and
preprocessing of an upload, for one forward pass of 1 image and of `--max-batch` images. CPU time, not wall time,
so that a machine shared with other jobs measures the work rather than its share of the cores. From these comes an
upper bound on the batching ratio with C cores: the one-at-a-time server runs one image per forward pass on one core
(at best 1/m1 requests/s), the batched one can at best spread its CPU per request (mB for the model + the decode d,
nothing else counted) over all C cores, so ratio <= C * m1 / (mB + d); with the clients' CPU per request c on the
same cores, C * m1 / (mB + d + c).

    .venv/bin/python bench/serve.py [--model RUN] [--clients 1,8,32] [--requests 256] [--seconds 40] [--repeats 2]
        [--max-batch 32] [--max-wait-ms 10] [--device cpu] [--images data/sample] [--threads N] [--dtype auto]
        [--no-model-costs | --model-costs-only]

`--threads N` starts both servers with OMP_NUM_THREADS=N (torch's intra-op threads; `classify serve` has no option
for it); `--dtype` is passed to `classify serve --dtype` when it is not `auto`.

Without --model, the backbone's ImageNet classes are served (`classify serve` without --model); a `classify train`
run adds its head and, by default, a flipped second pass (TTA) per image.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import socket
import statistics
import subprocess
import sys
import time
from pathlib import Path

import httpx

REPO = Path(__file__).resolve().parents[1]
OUT = REPO / "bench" / "out" / "serve.json"
WARMUP = 4


def uptime() -> str:
    """The machine's load averages (1, 5, 15 min), as `uptime` shows them."""
    one, five, fifteen = os.getloadavg()
    return f"load average {one:.2f}, {five:.2f}, {fifteen:.2f} on {os.cpu_count()} cores"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model: str | None, max_batch: int, max_wait_ms: float, device: str, threads: int | None = None,
                 dtype: str = "auto") -> tuple[subprocess.Popen, str]:
    """A `classify serve` process and its URL, once /health answers."""
    port = free_port()
    argv = [sys.executable, "-m", "classify.cli", "serve", "--port", str(port), "--device", device,
            "--max-batch", str(max_batch), "--max-wait-ms", str(max_wait_ms)]
    if model:
        argv += ["--run", model]
    if dtype != "auto":
        argv += ["--dtype", dtype]
    env = dict(os.environ, **({"OMP_NUM_THREADS": str(threads), "MKL_NUM_THREADS": str(threads)} if threads else {}))
    process = subprocess.Popen(argv, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env)
    url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 300
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise SystemExit(f"the server exited: {process.stdout.read()[-2000:]}")
        try:
            if httpx.get(f"{url}/health", timeout=2).status_code == 200:
                return process, url
        except httpx.HTTPError:
            pass
        time.sleep(0.25)
    process.kill()
    raise SystemExit("the server did not answer /health within 300 s")


def stop_server(process: subprocess.Popen) -> None:
    process.terminate()
    try:
        process.wait(timeout=60)
    except subprocess.TimeoutExpired:
        process.kill()


def cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of process `pid` so far (all its threads), from /proc; NaN where there is none."""
    try:
        fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    except OSError:
        return float("nan")
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def batching(url: str) -> dict:
    return httpx.get(f"{url}/model", timeout=30).json()["batching"]["predict"]


async def load(url: str, files: list[tuple[str, bytes]], clients: int, requests: int, seconds: float) -> dict:
    """`clients` concurrent clients sending one file per request until `requests` are answered or `seconds` pass."""
    latencies: list[float] = []
    errors: list[str] = []
    issued = 0
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    async with httpx.AsyncClient(base_url=url, timeout=300, limits=limits) as http:
        async def one(i: int) -> None:
            name, data = files[i % len(files)]
            t = time.perf_counter()
            try:
                response = await http.post("/predict", files={"file": (name, data)})
                if response.status_code != 200:
                    errors.append(f"{response.status_code}: {response.text[:200]}")
                    return
            except httpx.HTTPError as exc:
                errors.append(f"{type(exc).__name__}: {exc}")
                return
            latencies.append(time.perf_counter() - t)

        await asyncio.gather(*(one(i) for i in range(WARMUP)))
        latencies.clear()
        start = time.perf_counter()
        deadline = start + seconds

        async def client() -> None:
            nonlocal issued
            while issued < requests and time.perf_counter() < deadline:
                issued += 1
                await one(issued)

        await asyncio.gather(*(client() for _ in range(clients)))
        wall = time.perf_counter() - start
    ordered = sorted(latencies)

    def pct(q: float) -> float:
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))] * 1000 if ordered else float("nan")

    return {"clients": clients, "requests": len(latencies), "errors": len(errors), "error_examples": errors[:3],
            "seconds": round(wall, 2), "requests_per_second": round(len(latencies) / wall, 2),
            "p50_ms": round(pct(0.50), 1), "p99_ms": round(pct(0.99), 1),
            "mean_ms": round(statistics.fmean(latencies) * 1000, 1) if latencies else float("nan")}


def measure(server: tuple[subprocess.Popen, str], name: str, max_batch: int, files: list[tuple[str, bytes]],
            clients: int, args) -> dict:
    """One level against one server, with the server's mean batch and both sides' CPU per request over it."""
    process, url = server
    before = batching(url)
    server_cpu, client_cpu = cpu_seconds(process.pid), time.process_time()
    row = asyncio.run(load(url, files, clients, args.requests, args.seconds))
    server_cpu, client_cpu = cpu_seconds(process.pid) - server_cpu, time.process_time() - client_cpu
    after = batching(url)
    batches = after["batches"] - before["batches"]
    answered = max(1, row["requests"] + WARMUP)  # the CPU spans the warm-up requests too
    row.update(mode=name, max_batch=max_batch,
               mean_batch=round((after["items"] - before["items"]) / batches, 2) if batches else 0.0,
               server_cpu_ms_per_request=round(server_cpu / answered * 1000, 1),
               client_cpu_ms_per_request=round(client_cpu / answered * 1000, 1))
    print(f"  {name:>14}  {clients:>3} clients: {row['requests_per_second']:7.2f} req/s  p50 {row['p50_ms']:8.1f} ms  "
          f"p99 {row['p99_ms']:8.1f} ms  mean batch {row['mean_batch']:5.2f}  CPU/request server "
          f"{row['server_cpu_ms_per_request']:.1f} ms, clients {row['client_cpu_ms_per_request']:.1f} ms  "
          f"{row['requests']} requests, {row['errors']} errors", flush=True)
    return row


def model_costs(args, files: list[tuple[str, bytes]], max_batch: int) -> dict:
    """CPU ms per image of the served engine in this process, one torch thread: decode + preprocessing of an upload,
    one forward pass (with ranking) of 1 image, and of `max_batch` images (module docstring)."""
    import torch

    from classify.serve.engine import Engine, ServeSettings
    from curator.core.runtime import configure_allocator

    configure_allocator()  # as `classify serve` does (without it, batch 32's page faults cost more than its model)
    torch.set_num_threads(1)  # this bench is an entry point: the process-wide settings are its own
    engine = Engine.load(ServeSettings(model=args.model, device=args.device, dtype=args.dtype))
    start = time.process_time()
    uploads = [engine.decode(name, data, len(data)) for name, data in files]
    decode_ms = (time.process_time() - start) / len(files) * 1000
    items = [(u.pixels, 5) for u in uploads if u.pixels is not None]
    items = (items * (max_batch // len(items) + 1))[:max(max_batch, 16)]

    def per_image(batch: int, rounds: int) -> float:
        engine.predict(items[:batch])  # warm
        costs = []
        for r in range(rounds):
            chunk = [items[(r * batch + i) % len(items)] for i in range(batch)]
            start = time.process_time()
            engine.predict(chunk)
            costs.append((time.process_time() - start) / batch * 1000)
        return statistics.median(costs)

    single, batched = per_image(1, 16), per_image(max_batch, 3)
    return {"threads": 1, "dtype": engine.runtime.dtype, "folding": engine.folding,
            "decode_cpu_ms_per_image": round(decode_ms, 1), "model_cpu_ms_per_image_batch_1": round(single, 1),
            f"model_cpu_ms_per_image_batch_{max_batch}": round(batched, 1), "batch": max_batch,
            "model_only_ratio": round(single / batched, 2)}


def ratio_bounds(costs: dict, client_cpu_ms: float, cores: int) -> dict:
    """Upper bounds on batched / one-at-a-time requests/s with `cores` cores (module docstring)."""
    single, batched = costs["model_cpu_ms_per_image_batch_1"], costs[f"model_cpu_ms_per_image_batch_{costs['batch']}"]
    decode = costs["decode_cpu_ms_per_image"]
    return {"cores": cores, "server_only": round(cores * single / (batched + decode), 2),
            "with_clients_on_the_same_cores": round(cores * single / (batched + decode + client_cpu_ms), 2)}


def median_row(rows: list[dict]) -> dict:
    """The repeat with the median requests/s (its latencies with it), with every repeat's errors added up."""
    ordered = sorted(rows, key=lambda r: r["requests_per_second"])
    row = dict(ordered[len(ordered) // 2])
    row["errors"] = sum(r["errors"] for r in rows)
    row["repeats_requests_per_second"] = [r["requests_per_second"] for r in rows]
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--model", help="a `classify train` run folder (default: ImageNet classes)")
    parser.add_argument("--images", type=Path, default=REPO / "data" / "sample")
    parser.add_argument("--clients", type=lambda s: [int(x) for x in s.split(",")], default=[1, 8, 32])
    parser.add_argument("--requests", type=int, default=256, help="requests per level, at most")
    parser.add_argument("--seconds", type=float, default=40.0, help="seconds per level, at most")
    parser.add_argument("--repeats", type=int, default=2, help="runs of each level per mode, alternating (median)")
    parser.add_argument("--max-batch", type=int, default=32)
    parser.add_argument("--max-wait-ms", type=float, default=10.0)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--threads", type=int, help="OMP_NUM_THREADS for both servers (default: torch's own)")
    parser.add_argument("--dtype", default="auto", help="passed to `classify serve --dtype` unless auto")
    parser.add_argument("--no-model-costs", dest="model_costs", action="store_false",
                        help="skip the in-process model costs and the bound on the ratio")
    parser.add_argument("--model-costs-only", action="store_true",
                        help="only the in-process model costs (no servers; the bound without the clients' CPU)")
    parser.add_argument("--out", type=Path, default=OUT)
    args = parser.parse_args()

    files = [(p.name, p.read_bytes()) for p in sorted(args.images.rglob("*.jpg"))]
    if not files:
        raise SystemExit(f"no .jpg files under {args.images}")
    load_before = uptime()
    if args.model_costs_only:
        costs = model_costs(args, files, args.max_batch)
        bounds = ratio_bounds(costs, 0.0, os.cpu_count() or 1)
        print(json.dumps({"model_costs": costs, "ratio_bound": bounds["server_only"], "load_before": load_before,
                          "load_after": uptime()}))
        return
    print(f"{len(files)} images from {args.images}; model {args.model or 'ImageNet (no --model)'}; "
          f"device {args.device}; threads {args.threads or 'default'}; dtype {args.dtype}; {load_before}", flush=True)
    modes = {"micro-batched": args.max_batch, "one at a time": 1}
    servers = {}
    try:
        for name, max_batch in modes.items():  # both up at once, so that the levels alternate between them
            servers[name] = start_server(args.model, max_batch, args.max_wait_ms, args.device, args.threads,
                                         args.dtype)
        rows = []
        for clients in args.clients:
            runs: dict[str, list[dict]] = {name: [] for name in modes}
            for repeat in range(args.repeats):
                order = list(modes) if repeat % 2 == 0 else list(reversed(modes))  # neither always goes first
                for name in order:
                    runs[name].append(measure(servers[name], name, modes[name], files, clients, args))
            rows += [median_row(runs[name]) for name in modes]
    finally:
        for process, _ in servers.values():
            stop_server(process)
    load_after = uptime()
    print(f"\n{'clients':>8} {'batched req/s':>14} {'one-at-a-time':>14} {'ratio':>7} {'p50 batched':>12} "
          f"{'p50 single':>11} {'p99 batched':>12} {'p99 single':>11} {'CPU/req b':>10} {'CPU/req s':>10}")
    ratios = {}
    for clients in args.clients:
        b = next(r for r in rows if r["mode"] == "micro-batched" and r["clients"] == clients)
        s = next(r for r in rows if r["mode"] == "one at a time" and r["clients"] == clients)
        ratio = b["requests_per_second"] / s["requests_per_second"] if s["requests_per_second"] else float("nan")
        ratios[clients] = round(ratio, 2)
        print(f"{clients:>8} {b['requests_per_second']:>14.2f} {s['requests_per_second']:>14.2f} {ratio:>6.2f}x "
              f"{b['p50_ms']:>10.1f}ms {s['p50_ms']:>9.1f}ms {b['p99_ms']:>10.1f}ms {s['p99_ms']:>9.1f}ms "
              f"{b['server_cpu_ms_per_request']:>8.1f}ms {s['server_cpu_ms_per_request']:>8.1f}ms")
    errors = sum(r["errors"] for r in rows)
    print(f"errors: {errors}; load before: {load_before}; after: {load_after}")
    costs = bounds = None
    if args.model_costs:
        costs = model_costs(args, files, args.max_batch)
        top = max(args.clients)
        client_cpu = next(r for r in rows if r["mode"] == "micro-batched" and r["clients"] == top)
        bounds = ratio_bounds(costs, client_cpu["client_cpu_ms_per_request"], os.cpu_count() or 1)
        print(f"model costs (CPU ms per image, 1 thread, {costs['dtype']}, {costs['folding']}): decode + preprocess "
              f"{costs['decode_cpu_ms_per_image']}, forward at batch 1 {costs['model_cpu_ms_per_image_batch_1']}, at "
              f"batch {args.max_batch} {costs[f'model_cpu_ms_per_image_batch_{args.max_batch}']} (x"
              f"{costs['model_only_ratio']}); bound on the ratio with {bounds['cores']} cores: "
              f"{bounds['server_only']}x (server only), {bounds['with_clients_on_the_same_cores']}x (with these "
              f"clients' {client_cpu['client_cpu_ms_per_request']} ms/request on the same cores)", flush=True)
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps({"model": args.model, "device": args.device, "max_batch": args.max_batch,
                                    "repeats": args.repeats,
                                    "max_wait_ms": args.max_wait_ms, "images": len(files), "rows": rows,
                                    "ratios": ratios, "errors": errors, "load_before": load_before,
                                    "threads": args.threads, "dtype": args.dtype, "model_costs": costs,
                                    "ratio_bounds": bounds,
                                    "load_after": load_after}, indent=2) + "\n")
    print(f"written: {args.out}")
    if errors:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
