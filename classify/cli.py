"""`classify`: the model-side command line. Parses arguments, calls the library, prints; nothing else.

Option names say what they take: `--backbone` is a timm backbone (`train`, and `dir` without a run), `--run` a run
folder `classify train` wrote (`eval`, `dir`, `serve`). The old `--model` (a backbone in `train`, a run folder
elsewhere) still works for one release, with a one-line deprecation warning on stderr.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape
from rich.table import Table

from classify.serve import DEFAULT_MAX_BATCH as SERVE_MAX_BATCH
from classify.serve import DEFAULT_MAX_BYTES as SERVE_MAX_BYTES
from classify.serve import DEFAULT_MAX_WAIT_MS as SERVE_MAX_WAIT_MS
from classify.serve import DEFAULT_PORT as SERVE_PORT
from curator.cli_support import (
    StageDisplay,
    console,
    err_console,
    fail,
    pipeline_order,
    progress_bar,
    renamed,
    required,
    reset_deprecations,
    say_deprecations,
    version_option,
)
from curator.core.errors import AtelierError, UsageError
from curator.core.runtime import configure_allocator

app = typer.Typer(
    name="classify",
    cls=pipeline_order("models", "train", "eval", "dir", "serve"),
    help="Train, evaluate and run image classifiers on pretrained timm backbones.",
    epilog="The model side, in order (after `curator split --workspace curated`):\n\n"
           "classify models --load\n\n"
           "classify train --splits curated/splits.parquet --out runs/styles\n\n"
           "classify eval --run runs/styles\n\n"
           "classify dir ./paintings --out predictions.parquet --run runs/styles\n\n"
           "classify serve --run runs/styles --port 8000",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)

#: The deprecated `--model` of the commands that now say `--run` (hidden from --help; one release).
OldRunOpt = Annotated[Path | None, typer.Option("--model", hidden=True, help="Deprecated: use --run.")]


@app.callback()
def _root(
    show_version: Annotated[bool, typer.Option("--version", callback=version_option("classify"), is_eager=True,
                                               help="Print the version and exit.")] = False,
) -> None:
    """Train, evaluate and run image classifiers on pretrained timm backbones.

    A run folder (`--run`) is what `classify train --out` wrote: model.safetensors, model.json, history.csv.
    """
    reset_deprecations()


@app.command()
def models(
    load: Annotated[bool, typer.Option(help="Also load each installed backbone and report its feature width.")] = False,
) -> None:
    """List the backbones that work offline, whether their weights are installed, and how to get the others."""
    from classify.models import describe_backbones

    try:
        rows = describe_backbones(load=load)
    except AtelierError as exc:
        raise fail(exc) from None
    table = Table(title="offline backbones")
    for column in ("name", "installed", "input", "features", "description"):
        table.add_column(column)
    for row in rows:
        table.add_row(row.name, "yes" if row.installed else "no", row.input_size or "-",
                      str(row.feature_dim) if row.feature_dim else "-", escape(row.description))
    console.print(table)
    console.print("Any other timm model name works with network access (Hugging Face hub) or --weights FILE.")


class EpochDisplay(StageDisplay):
    """Renders the training/eval events: a progress bar per stage (each replacing the last), a table line per
    epoch."""

    COLUMNS = ("epoch", "stage", "train_loss", "train_accuracy", "val_loss", "val_accuracy", "val_macro_f1", "lr",
               "seconds")

    def __init__(self, bar):
        super().__init__(bar, replace=True)
        self.header = False

    def __call__(self, kind: str, info: dict) -> None:
        if kind != "epoch":
            return super().__call__(kind, info)
        if not self.header:
            self.bar.console.print("  ".join(f"{c:>14}" for c in self.COLUMNS), style="bold")
            self.header = True
        cells = []
        for c in self.COLUMNS:
            v = info.get(c)
            cells.append(f"{v:>14.4f}" if isinstance(v, float) else f"{'-' if v is None else v!s:>14}")
        self.bar.console.print("  ".join(cells), highlight=False)


@app.command()
def train(
    splits: Annotated[Path, typer.Option(help="splits.parquet from `curator split` (or its workspace folder).")],
    out: Annotated[Path, typer.Option(help="Run folder for the checkpoint, history and plots.")] = Path("runs/model"),
    backbone: Annotated[str | None, typer.Option(
        help="Backbone: an offline one (see `classify models`) or any timm name (formerly --model). Default "
             "efficientnet_lite2: its probe beat Lite0's by 8 points on wikiart-dev.", show_default=False)] = None,
    old_backbone: Annotated[str | None, typer.Option("--model", hidden=True, help="Deprecated: use --backbone.")]
    = None,
    weights: Annotated[Path | None, typer.Option(help="Weights file for the backbone (safetensors or state dict).")]
    = None,
    epochs: Annotated[int, typer.Option(help="Stage-2 fine-tuning epochs (try 10); 0, the default: the stage-1 "
                                             "probe only. Off by default because on wikiart-dev's artist-disjoint "
                                             "test it did not pay: Lite2 probe 0.564 vs fine-tuned 0.458 (6.5 min), "
                                             "Lite0 0.480 vs 0.447; val rose a little while test fell "
                                             "(docs/BENCHMARKS.md). When on, the probe is kept if val says stage 2 "
                                             "did not help.")] = 0,
    unfreeze: Annotated[int, typer.Option(help="How many of the backbone's last blocks stage 2 trains.")] = 2,
    gram: Annotated[bool, typer.Option(help="Add the Gram matrices of the middle stages (second-order style "
                                            "statistics) to the features. Off by default: on wikiart-dev (Lite2) "
                                            "they moved 5 artist-disjoint folds from 0.635 to 0.650 and the fixed "
                                            "test from 0.542 to 0.528, at 4.6x the embedding cache and a slower "
                                            "probe (docs/BENCHMARKS.md).")] = False,
    batch_size: Annotated[int, typer.Option(help="Stage-2 batch size.")] = 32,
    lr: Annotated[float, typer.Option(help="Stage-2 learning rate of the backbone (the head gets 3x).")] = 3e-4,
    weight_decay: Annotated[float, typer.Option(help="AdamW weight decay.")] = 0.05,
    label_smoothing: Annotated[float, typer.Option(help="Label smoothing of the loss.")] = 0.1,
    dropout: Annotated[float, typer.Option(help="Dropout before the head.")] = 0.2,
    balance: Annotated[str, typer.Option(help="Class balance: loss (weights), sampler, or none.")] = "loss",
    patience: Annotated[int, typer.Option(help="Stop after this many epochs without a better val macro-F1.")] = 4,
    tta: Annotated[bool, typer.Option(help="Average predictions with the horizontal flip.")] = True,
    positive: Annotated[str | None, typer.Option(help="One-vs-rest: this class (or group, see --positive-column) "
                                                     "against all others.")] = None,
    positive_column: Annotated[str, typer.Option(help="Column --positive names: label or group (artist).")]
    = "label",
    min_precision: Annotated[float | None, typer.Option(help="One-vs-rest: the threshold with the best recall at "
                                                              "this val precision (default: max F1).")] = None,
    target_dir: Annotated[Path | None, typer.Option(help="Domain adaptation (DANN) towards the unlabeled images in "
                                                         "this folder; class folders give target accuracy.")] = None,
    seed: Annotated[int, typer.Option(help="Seed of every random choice.")] = 0,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
    dtype: Annotated[str, typer.Option(help="auto (fp32 on CPU, bf16 on CUDA), fp32, bf16 or fp16.")] = "auto",
    workers: Annotated[int | None, typer.Option(help="Decode/augmentation worker processes.")] = None,
    pixel_cache_max_gb: Annotated[float, typer.Option(help="Stage 2 decodes each image once into a pixel cache in "
                                                           "the workspace while the images it reads take at most "
                                                           "this many GB there (Lite2: 0.26 MB per image); above "
                                                           "it, every epoch decodes on the fly. A probe-only run "
                                                           "writes no pixel cache.")] = 32.0,
) -> None:
    """Train a classifier: a linear probe on the cached embeddings (seconds); with --epochs N, then fine-tune the
    last blocks.

    Stage 2 uses augmentation (random resized crop, flip, rotation, colour jitter), label smoothing, dropout, weight
    decay, class-balanced loss, a cosine schedule with warm-up and early stopping on val macro-F1; the best epoch is
    kept. Writes OUT/model.safetensors, OUT/model.json and OUT/history.csv.
    """
    from classify.train import TrainSettings
    from classify.train import train as run_train

    try:
        backbone = renamed(backbone, old_backbone, "--backbone", "--model", default="efficientnet_lite2")
        settings = TrainSettings(
            model=backbone, weights=str(weights) if weights else None, epochs=epochs, unfreeze=unfreeze, gram=gram,
            batch_size=batch_size, lr=lr, weight_decay=weight_decay, label_smoothing=label_smoothing, dropout=dropout,
            balance=balance, patience=patience, tta=tta, positive=positive, positive_column=positive_column,
            min_precision=min_precision, target_dir=str(target_dir) if target_dir else None, seed=seed,
            device=device, dtype=dtype, workers=workers, pixel_cache_max_gb=pixel_cache_max_gb)
        configure_allocator()  # the process's allocator: set by the CLI, never by the library
        with progress_bar() as bar:
            result = run_train(splits, out, settings, EpochDisplay(bar))
    except AtelierError as exc:
        raise fail(exc) from None
    for line in result.warnings:
        err_console.print(f"[yellow]warning:[/] {escape(line)}")
    console.print(f"best epoch {result.best_epoch}: val accuracy {result.val['accuracy']:.4f}, "
                  f"val macro-F1 {result.val['macro_f1']:.4f} on {result.val['images']} images "
                  f"({result.runtime.device}, {result.runtime.dtype})")
    if result.threshold is not None:
        console.print(f"threshold {result.threshold:.4f}: val precision {result.val['positive_precision']:.3f}, "
                      f"recall {result.val['positive_recall']:.3f}, F1 {result.val['positive_f1']:.3f}")
    if result.target:
        for key, value in result.target.items():
            console.print(f"target {key}: {value}")
    table = Table(title="where the time went")
    table.add_column("stage")
    table.add_column("seconds", justify="right")
    for stage, seconds in result.timings.items():
        table.add_row(stage, f"{seconds:.1f}")
    console.print(table)
    console.print(f"model: {result.run_dir / 'model.safetensors'} + model.json, history: "
                  f"{result.run_dir / 'history.csv'}")
    say_deprecations()


@app.command("eval")
def evaluate(
    run: Annotated[Path | None, typer.Option(help="Run folder written by `classify train` (required; formerly "
                                                  "--model).", show_default=False)] = None,
    old_run: OldRunOpt = None,
    splits: Annotated[Path | None, typer.Option(help="Splits file (default: the one the model was trained on).")]
    = None,
    split: Annotated[str, typer.Option(help="Which split of the splits file: train, val or test.")] = "test",
    directory: Annotated[Path | None, typer.Argument(help="Evaluate on this class-folder tree instead.")] = None,
    out: Annotated[Path | None, typer.Option(help="Output folder (default: RUN/eval-SPLIT).")] = None,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
    batch_size: Annotated[int, typer.Option(help="Batch size.")] = 64,
    workers: Annotated[int | None, typer.Option(help="Decode worker processes.")] = None,
) -> None:
    """Accuracy, top-k, per-class precision/recall/F1, confusion matrix, curves and an error gallery."""
    from classify.evaluate import evaluate as run_eval

    try:
        run = required(renamed(run, old_run, "--run", "--model"), "--run")
        configure_allocator()  # the process's allocator: set by the CLI, never by the library
        with progress_bar() as bar:
            result = run_eval(run, splits, split, directory, out, device=device, batch_size=batch_size,
                              workers=workers, events=EpochDisplay(bar))
    except AtelierError as exc:
        raise fail(exc) from None
    m = result.metrics
    table = Table(title=f"{escape(m['source'])}: accuracy {m['accuracy']:.4f}, macro-F1 {m['macro_f1']:.4f}")
    for column in ("class", "precision", "recall", "f1", "support"):
        table.add_column(column, justify="left" if column == "class" else "right")
    for name, row in m["per_class"].items():
        table.add_row(escape(name), f"{row['precision']:.3f}", f"{row['recall']:.3f}", f"{row['f1']:.3f}",
                      str(row["support"]))
    console.print(table)
    extra = [f"top-{k} {m[f'top{k}_accuracy']:.4f}" for k in (3, 5) if f"top{k}_accuracy" in m]
    if extra:
        console.print(", ".join(extra))
    if "positive" in m:
        p = m["positive"]
        console.print(f"{escape(p['class'])} at threshold {m['threshold']:.4f}: precision {p['precision']:.3f}, "
                      f"recall {p['recall']:.3f}, F1 {p['f1']:.3f}, average precision {p['average_precision']}")
    if m["errors"] or m["skipped"]:
        err_console.print(f"[yellow]{m['errors']} unreadable, {m['skipped']} skipped (not in a class folder)[/]")
    for name, path in result.files.items():
        console.print(f"{name}: {path}")
    say_deprecations()


@app.command("dir")
def classify_directory(
    directory: Annotated[Path, typer.Argument(help="Folder of images (searched recursively).")],
    out: Annotated[Path, typer.Option(help="Output Parquet file, one row per file.")],
    run: Annotated[Path | None, typer.Option(help="Run folder of `classify train` (formerly --model; default: the "
                                                  "backbone's ImageNet-1k classes).")] = None,
    old_run: OldRunOpt = None,
    backbone: Annotated[str, typer.Option(help="Backbone when no --run is given.")] = "efficientnet_lite0",
    weights: Annotated[Path | None, typer.Option(help="Weights file for --backbone.")] = None,
    top_k: Annotated[int, typer.Option(help="How many labels and scores per row.")] = 5,
    batch_size: Annotated[int | None, typer.Option(help="Images per model batch (default: 256 on CUDA, 64 on "
                                                        "CPU).")] = None,
    workers: Annotated[int | None, typer.Option(help="Decode worker processes (default: cores - 1 on CUDA, 1 on "
                                                     "CPU, none for a folder of at most 64 files).")] = None,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
    dtype: Annotated[str, typer.Option(help="auto (fp32 on CPU, fp16 on CUDA), fp32, bf16 (native CPUs only), "
                                            "fp16.")] = "auto",
    gpu_decode: Annotated[bool, typer.Option(help="Decode JPEGs on the GPU with nvjpeg (on one H200 no faster than "
                                                  "the CPU workers, and 4% of top-1 classes moved).")] = False,
    embeddings: Annotated[bool, typer.Option(help="Also store each image's feature vector.")] = False,
    resume: Annotated[bool, typer.Option(help="Finish an interrupted run (or reuse a finished one).")] = False,
    compile: Annotated[bool, typer.Option(help="torch.compile the model first (worth it on GPUs).")] = False,
    max_bytes: Annotated[int, typer.Option(help="Files larger than this many bytes are not read (a row says so).")]
    = 1 << 30,
    follow_symlinks: Annotated[bool, typer.Option(help="Read symbolic links that lead outside DIRECTORY (by default "
                                                       "each gets a row saying where it points).")] = False,
    engine: Annotated[str, typer.Option(help="local (this machine) or ray (a Ray cluster, with Ray Data; needs "
                                             "pip install 'atelier[ray]'). Same rows either way.")] = "local",
    address: Annotated[str | None, typer.Option(help="--engine ray: the cluster, auto, ray://HOST:PORT or HOST:PORT "
                                                     "(default: RAY_ADDRESS, as under `ray job submit`, else a local "
                                                     "Ray on this machine).")] = None,
    num_gpus_per_worker: Annotated[float | None, typer.Option(help="--engine ray: GPUs per model actor (default 1 "
                                                                   "when the cluster has GPUs, else 0).")] = None,
    concurrency: Annotated[int | None, typer.Option(help="--engine ray: model actors (default one per GPU, or half "
                                                         "the CPUs on a cluster without GPUs).")] = None,
) -> None:
    """Classify every file under DIRECTORY into a Parquet file: predicted class, confidence, top-k, error per file.

    Streaming with bounded memory; rows are flushed every 2,048 files into OUT.parts, so an interrupted run keeps
    them and --resume finishes the rest with no row lost or repeated (only a run with the same folder, model and
    options). FIFOs, devices, oversized files and links leaving DIRECTORY become rows without being read. With
    --engine ray the files are decoded in Ray tasks and classified by a pool of model actors (one per GPU), each
    2,048-file shard written to OUT.parts as it finishes; DIRECTORY and OUT must be at the same path on every node.
    """
    from classify.predict import PredictSettings, classify_dir
    from curator.core.paths import display
    from curator.embedding.ray_embed import engine_settings

    try:
        run = renamed(run, old_run, "--run", "--model")
        ray_settings = engine_settings(engine, address, num_gpus_per_worker, concurrency)
        settings = PredictSettings(
            model=str(run) if run else None, backbone=backbone, weights=str(weights) if weights else None,
            top_k=top_k, batch_size=batch_size, workers=workers, device=device, dtype=dtype, embeddings=embeddings,
            resume=resume, compile=compile, max_bytes=max_bytes, follow_symlinks=follow_symlinks,
            gpu_decode=gpu_decode)
        configure_allocator()  # the process's allocator: set by the CLI, never by the library
        with progress_bar() as bar:
            if ray_settings is None:
                result = classify_dir(directory, out, settings, EpochDisplay(bar))
            else:
                from classify.ray_engine import classify_dir_ray

                result = classify_dir_ray(directory, out, settings, ray_settings, EpochDisplay(bar))
    except AtelierError as exc:
        raise fail(exc) from None
    table = Table(title="classify dir")
    columns = ("files", "classified", "errors", "resumed", "images/s", "device")
    for column in (*columns, *(() if ray_settings else ("bound by",))):
        table.add_column(column, justify="right")
    cells = [str(result.files), str(result.predicted), str(result.errors), str(result.resumed_rows),
             f"{result.images_per_second:.1f}", f"{result.runtime.device} {result.runtime.dtype}"]
    table.add_row(*cells, *(() if ray_settings else (f"{result.bound} ({result.wait_share:.0%} waiting for data)",)))
    console.print(table)
    if ray_settings is None:
        console.print(f"batch {result.batch_size}, {result.workers} decode workers, {result.device_jpegs} JPEGs "
                      f"decoded on the GPU; the model waited {result.wait_seconds:.1f} s of {result.seconds:.1f} s "
                      f"for data")
    elif result.plan is not None:
        console.print(f"engine ray: {result.plan.concurrency} model actors ({result.plan.num_gpus:g} GPU each), "
                      f"batch {result.batch_size}, {result.shards} shards of up to {result.shard_size} files, "
                      f"{result.seconds:.1f} s")
    console.print(f"model: {escape(result.model)}")
    console.print(f"predictions: {escape(display(str(result.out)))}")
    say_deprecations()


@app.command()
def serve(
    run: Annotated[Path | None, typer.Option(help="Run folder of `classify train` (formerly --model; default: the "
                                                  "backbone's ImageNet-1k classes).")] = None,
    old_run: OldRunOpt = None,
    host: Annotated[str, typer.Option(help="Address to listen on (0.0.0.0: every interface, as in a container).")]
    = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on (0: any free one).")] = SERVE_PORT,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
    max_bytes: Annotated[int, typer.Option(help="Largest upload, in bytes; a larger file gets a 413 with a JSON "
                                                "error.")] = SERVE_MAX_BYTES,
    max_batch: Annotated[int, typer.Option(help="Most images in one forward pass (1: no micro-batching).")]
    = SERVE_MAX_BATCH,
    max_wait_ms: Annotated[float, typer.Option(help="How long the first request of a batch waits for others, in "
                                                    "milliseconds.")] = SERVE_MAX_WAIT_MS,
) -> None:
    """Serve the model over HTTP: POST /predict and /similar, GET /model and /health, a web page at /.

    Predictions go through the same loading, preprocessing and ranking as `classify dir`, so a served prediction
    equals the batch one. Concurrent requests share forward passes (micro-batching); bad uploads get a 4xx with a
    JSON error. Needs the serve extra: pip install 'atelier[serve]'.
    """
    from classify.serve import require_extra

    try:
        run = renamed(run, old_run, "--run", "--model")
        require_extra()
        from classify.serve.app import bind
        from classify.serve.app import serve as run_server
        from classify.serve.engine import Engine, ServeSettings

        if not 0 <= port <= 65535:
            raise UsageError(f"--port must be 0 to 65535, got {port}")
        settings = ServeSettings(model=str(run) if run else None, device=device, max_bytes=max_bytes,
                                 max_batch=max_batch, max_wait_ms=max_wait_ms)
        sock = bind(host, port)  # before the model loads, so that a port in use is said at once
        configure_allocator()
        try:
            engine = Engine.load(settings)
        except BaseException:
            sock.close()
            raise
    except AtelierError as exc:
        raise fail(exc) from None
    similar = engine.similar.card()
    where = (f"{similar['images']} training images" if similar["available"] else f"unavailable ({similar['reason']})")
    bound = sock.getsockname()
    say_deprecations()  # once the model is loaded: a refusal above said it in its one line
    console.print(f"serving {escape(engine.predictor.name)} on http://{escape(host)}:{bound[1]} "
                  f"({engine.runtime.device} {engine.runtime.dtype}); similar images: {escape(where)}", highlight=False,
                  soft_wrap=True)
    console.print(f"page: http://{escape(host)}:{bound[1]}/  API docs: /docs  (Ctrl-C stops)", highlight=False)
    stopped_by = run_server(engine, sock)
    console.print(f"stopped{f' ({stopped_by})' if stopped_by else ''}", highlight=False)


def main() -> None:
    from curator import entry

    entry.main(app)


if __name__ == "__main__":
    main()
