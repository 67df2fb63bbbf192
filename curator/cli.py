"""`curator`: the data-side command line. Parses arguments, calls the library, prints; nothing else."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich.markup import escape
from rich.table import Table

from curator.cli_support import (
    StageDisplay,
    console,
    fail,
    pipeline_order,
    progress_bar,
    version_option,
)
from curator.core.errors import AtelierError, UsageError
from curator.core.settings import (
    DEFAULT_MAX_BYTES,
    QUALITY_CHECKS,
    DuplicateSettings,
    MislabelSettings,
    QualitySettings,
)

app = typer.Typer(
    name="curator",
    cls=pipeline_order("ingest", "clean", "split"),
    help="Turn messy folders of artwork images into clean, leak-free training sets.",
    epilog="The pipeline, in order (then `classify train --splits curated/splits.parquet --out runs/styles`):\n\n"
           "curator ingest folder ./downloads --out raw --group-pattern '^([^_]+)_'\n\n"
           "curator clean raw --out curated --export clean-set\n\n"
           "curator split --workspace curated",
    no_args_is_help=True,
    add_completion=False,
    pretty_exceptions_enable=False,
)
DUP = DuplicateSettings()


@app.callback()
def _root(
    show_version: Annotated[bool, typer.Option("--version", callback=version_option("curator"), is_eager=True,
                                               help="Print the version and exit.")] = False,
) -> None:
    """Turn messy folders of artwork images into clean, leak-free training sets.

    Stages share one workspace (default ./curated): a Parquet manifest with one row per file, and cached embeddings.
    """


ingest_app = typer.Typer(help="Fetch images into a class-folder tree with catalog.parquet (provenance per image).",
                         no_args_is_help=True)
app.add_typer(ingest_app, name="ingest")


@app.command(short_help="Check every file, find duplicates, conflicts, mislabels and quality issues; write the "
                        "manifest and report.html.")
def clean(
    root: Annotated[Path, typer.Argument(help="Folder of images, one subfolder per class (label).")],
    out: Annotated[Path, typer.Option("--out", "-o", help="Workspace for the manifest, caches and reports.")] = Path(
        "curated"),
    group_pattern: Annotated[str | None, typer.Option(
        help="Regex on the file name whose first group is the row's group (e.g. artist: '^([^_]+)_'). "
             "Groups never span two splits.")] = None,
    backbone: Annotated[str, typer.Option(
        help="Embedding model: an offline one (efficientnet_lite0, default) or any timm name.")] = "efficientnet_lite0",
    weights: Annotated[Path | None, typer.Option(
        help="Weights for --backbone: a .safetensors file or a torch state dict (never unpickled).")] = None,
    device: Annotated[str, typer.Option(help="auto, cpu or cuda.")] = "auto",
    dtype: Annotated[str, typer.Option(
        help="auto (fp32 on CPU, fp16 autocast on CUDA), fp32, bf16 (CUDA, or a CPU with native bf16) or fp16 "
             "(CUDA).")] = "auto",
    batch_size: Annotated[int | None, typer.Option(
        min=1, help="Images per model batch (default: 256 on CUDA, 64 on CPU).")] = None,
    workers: Annotated[int | None, typer.Option(
        min=0, help="Decode worker processes (default: cores - 1 on CUDA, 1 on CPU, none for at most 64 "
                    "files).")] = None,
    conflicts: Annotated[str, typer.Option(
        help="Duplicate clusters whose members carry different labels: drop (keep none), majority (keep the "
             "majority label's best copy) or keep (ignore labels).")] = "drop",
    phash_radius: Annotated[int, typer.Option(
        help="Near-duplicate: full-frame pHash distance at most this...")] = DUP.phash_radius,
    dhash_radius: Annotated[int, typer.Option(help="... and dHash distance at most this.")] = DUP.dhash_radius,
    crop_radius: Annotated[int, typer.Option(
        help="Cropped copy: full-frame pHash within this of a centre-crop pHash of the other.")] = DUP.crop_radius,
    hash_gap_factor: Annotated[float, typer.Option(
        help="Hash pairs also need embedding cosine >= 1 - this x the median nearest-neighbour gap.")
    ] = DUP.hash_gap_factor,
    embed_relative: Annotated[float, typer.Option(
        help="Embedding near-duplicate: 1 - cosine below this fraction of the median nearest-neighbour gap.")
    ] = DUP.embed_relative,
    verify_radius: Annotated[int, typer.Option(
        help="Embedding pairs are kept only if their best crop-aligned pHash distance is at most this.")
    ] = DUP.verify_radius,
    colour_min: Annotated[float, typer.Option(
        help="Near-duplicates need colour signatures with at least this cosine (grey images always agree).")
    ] = DUP.colour_min,
    flag_only: Annotated[bool, typer.Option(
        "--flag-only", help="Keep the mislabel outliers (every witness contradicts the label: removed by default) "
                            "too, marked status outlier. Unusual images (tier review) are always kept.")] = False,
    relabel: Annotated[bool, typer.Option(
        "--relabel", help="Keep mislabel outliers under the suggested label where the evidence is strong "
                          "(mislabel score >= 0.9), recording the original; drop the other outliers.")] = False,
    export: Annotated[Path | None, typer.Option(
        help="Also place the kept images in this folder as a class-folder tree (hard links where possible, "
             "copies otherwise; never overwriting other files), with their manifest.")] = None,
    max_bytes: Annotated[int, typer.Option(
        help="Files larger than this many bytes are not read (a `corrupt` row says so).")] = DEFAULT_MAX_BYTES,
    follow_symlinks: Annotated[bool, typer.Option(
        "--follow-symlinks", help="Also read files and folders that symbolic links reach outside ROOT (by default "
                                  "such a link is a row saying where it points).")] = False,
    drop_quality: Annotated[bool, typer.Option(
        "--drop-quality", help="Remove images flagged by the image-quality checks (blurry, dark, bright, near-blank, "
                               "odd aspect, odd size; thresholds follow the collection) instead of only flagging "
                               "them.")] = False,
    engine: Annotated[str, typer.Option(
        help="Where the embedding pass runs: local (this machine) or ray (a Ray cluster, with Ray Data; needs pip "
             "install 'atelier[ray]'). The later stages run here either way.")] = "local",
    address: Annotated[str | None, typer.Option(
        help="--engine ray: the cluster, auto, ray://HOST:PORT or HOST:PORT (default: RAY_ADDRESS, as under `ray job "
             "submit`, else a local Ray on this machine).")] = None,
    num_gpus_per_worker: Annotated[float | None, typer.Option(
        help="--engine ray: GPUs per model actor (default 1 when the cluster has GPUs, else 0).")] = None,
    concurrency: Annotated[int | None, typer.Option(
        help="--engine ray: model actors (default one per GPU, or half the CPUs on a cluster without GPUs).")] = None,
) -> None:
    """Scan ROOT, check every file, embed every usable image once (cached), find duplicates, label conflicts and
    likely mislabelled images, and write the manifest and report.html.

    With --engine ray the embedding pass (integrity, hashes, fingerprints, features) runs on a Ray cluster: decoding
    in Ray tasks, the model in a pool of actors (one per GPU); ROOT and --out must be at the same path on every node.
    """
    from curator.core.runtime import configure_allocator
    from curator.embedding.embed import embed_files
    from curator.embedding.ray_embed import RayEmbedder, engine_settings, refuse_local_options
    from curator.stages.clean import CleanSettings
    from curator.stages.clean import clean as run_clean
    from curator.stages.export import check_destination, export_kept

    try:
        ray_settings = engine_settings(engine, address, num_gpus_per_worker, concurrency)
        if ray_settings is not None:
            refuse_local_options(workers)
    except AtelierError as exc:
        raise fail(exc) from None
    embedder = (embed_files if ray_settings is None else
                RayEmbedder(ray_settings, device, dtype, batch_by_device=batch_size is None))
    configure_allocator()
    try:
        duplicates = DuplicateSettings(phash_radius=phash_radius, dhash_radius=dhash_radius, crop_radius=crop_radius,
                                       hash_gap_factor=hash_gap_factor, embed_relative=embed_relative,
                                       verify_radius=verify_radius, colour_min=colour_min, conflicts=conflicts)
    except ValueError as exc:
        raise fail(UsageError(str(exc))) from None
    if flag_only and relabel:
        raise fail(UsageError("--flag-only and --relabel exclude each other; choose one"))
    mislabels = MislabelSettings(action="flag-only" if flag_only else "relabel" if relabel else "remove")
    if batch_size is None:
        from curator.embedding.dataplane import default_batch_size

        batch_size = default_batch_size(device)
    settings = CleanSettings(root=root, workspace=out, group_pattern=group_pattern, backbone=backbone,
                             weights=weights, device=device, dtype=dtype, batch_size=batch_size, workers=workers,
                             max_bytes=max_bytes, follow_symlinks=follow_symlinks, duplicates=duplicates,
                             mislabels=mislabels, quality=QualitySettings(drop=drop_quality))
    try:
        if export is not None:
            check_destination(root, export, workspace=out)
        with progress_bar() as bar:
            result = run_clean(settings, StageDisplay(bar), embedder)
        exported = export_kept(result.manifest, result.root, export) if export is not None else None
    except AtelierError as exc:
        raise fail(exc) from None
    print_clean_summary(result)
    if ray_settings is not None and embedder.plan is not None:
        console.print(f"engine ray: the embedding pass ran on {embedder.plan.concurrency} model actors "
                      f"({embedder.plan.num_gpus:g} GPU each), {embedder.runtime.device} {embedder.runtime.dtype}")
    if exported is not None:
        console.print(f"export: {exported.files} kept images in [bold]{exported.destination}[/] ({exported.linked} "
                      f"hard-linked, {exported.copied} copied, {exported.already_there} already there)")


@app.command(short_help="Leak-free train/val/test splits (or grouped folds) of the kept images.")
def split(
    workspace: Annotated[Path, typer.Option("--workspace", "-w", help="The workspace `curator clean` wrote.")] = Path(
        "curated"),
    ratios: Annotated[str, typer.Option(help="train,val,test proportions.")] = "0.8,0.1,0.1",
    balance: Annotated[str, typer.Option(
        help="none, undersample, oversample or cap:N; recorded as a per-row weight, never by copying files.")] = "none",
    balance_all: Annotated[bool, typer.Option("--balance-all", help="Balance val and test too, not only train.")
                           ] = False,
    group_pattern: Annotated[str | None, typer.Option(
        help="Regex on the file name whose first group is the group (default: the manifest's group).")] = None,
    folds: Annotated[int | None, typer.Option(help="K grouped cross-validation folds instead of splits.")] = None,
    groups: Annotated[bool, typer.Option(help="Keep each group in one split; --no-groups keeps only duplicate "
                                              "clusters together (for one artist against the rest).")] = True,
    seed: Annotated[int, typer.Option(help="Seed; the same manifest and seed give the same file.")] = 0,
    allow_leaks: Annotated[bool, typer.Option(
        "--allow-leaks", help="Write the split even if near-duplicate pairs still cross it after the placement rounds "
                              "(they are listed in split_report.json); without it such a split is not written, "
                              "exit 1.")] = False,
) -> None:
    """Split the cleaned images: stratified by label, no group or duplicate cluster in two splits, with a leak
    certificate (split_report.json) at the duplicate thresholds `curator clean` recorded in settings.json."""
    from curator.stages.splits import SplitSettings, make_splits

    try:
        parts = tuple(float(x) for x in ratios.split(","))
    except ValueError:
        raise fail(UsageError(f"--ratios must be three numbers like 0.8,0.1,0.1; got {ratios!r}")) from None
    try:
        settings = SplitSettings(ratios=parts, balance=balance, balance_all=balance_all, group_pattern=group_pattern,
                                 folds=folds, seed=seed, use_groups=groups, allow_leaks=allow_leaks)
        result = make_splits(workspace, settings)
    except AtelierError as exc:
        raise fail(exc) from None
    report = result.report
    table = Table(title="curator split")
    table.add_column("class")
    names = list(report["counts"])
    for name in names:
        table.add_column(name, justify="right")
    for label in sorted({c for counts in report["counts"].values() for c in counts}):
        table.add_row(label, *[str(report["counts"][n].get(label, 0)) for n in names])
    table.add_row("[bold]share", *[f"[bold]{report['proportions'][n]:.3f}" for n in names])
    console.print(table)
    cert = report["certificate"]
    console.print(f"groups: {report['groups']}, units kept together (groups + duplicate clusters): {report['units']}")
    closest = cert["min_cross_split_phash_distance"]
    closest = closest if cert.get("min_cross_split_phash_distance_exact", True) else f"> {cert['phash_radius']}"
    console.print(f"certificate: largest cross-split cosine {cert['max_cross_split_cosine']:.3f} (duplicate threshold "
                  f"{cert['cosine_threshold']:.3f}); smallest cross-split pHash distance "
                  f"{closest} (radius {cert['phash_radius']}); pairs above either: "
                  f"{cert['pairs_above_cosine_or_phash']} after {len(report['certificate_rounds'])} round(s)")
    for warning in result.warnings:
        console.print(f"[yellow]warning:[/] {escape(warning)}")
    console.print(f"splits: [bold]{result.path}[/]")


def print_clean_summary(result) -> None:
    import polars as pl

    from curator.stages.mislabels import estimate_text

    df = result.manifest
    table = Table(title="curator clean", show_footer=False)
    table.add_column("class")
    statuses = ["ok", "corrupt", "ignored", "duplicate", "conflict", "outlier", "low_quality"]
    for status in ["files", *statuses]:
        table.add_column(status, justify="right")
    per = df.group_by("label").agg(
        pl.len().alias("files"), *[(pl.col("status") == s).sum().alias(s) for s in statuses]
    ).sort("label", nulls_last=True)
    for row in per.iter_rows(named=True):
        table.add_row(row["label"] or "(root)", *[str(row[c]) for c in ["files", *statuses]])
    totals = [str(len(df)), *[str(int((df["status"] == s).sum())) for s in statuses]]
    table.add_row("[bold]total", *[f"[bold]{t}" for t in totals])
    console.print(table)
    e = result.embed
    rate = f"{e.images_per_second:.1f} images/s; " if e.computed else ""
    console.print(f"embeddings: {e.computed} computed, {e.reused} reused from cache "
                  f"({rate}{result.runtime.device}, {result.runtime.dtype})")
    for stage in ("exact", "phash", "embedding"):
        flagged = df.filter(pl.col(f"is_{stage}_issue"))
        console.print(f"{stage:>9}: {len(flagged)} images in {flagged[f'{stage}_group'].n_unique()} groups")
    clusters = df.filter(pl.col("cluster").is_not_null())
    console.print(f" clusters: {clusters['cluster'].n_unique()} with {len(clusters)} images; "
                  f"{int((df['status'] == 'duplicate').sum())} set aside as duplicates, "
                  f"{int((df['status'] == 'conflict').sum())} as label conflicts")
    flagged = df.filter(pl.col("is_mislabel_issue").fill_null(False))
    relabelled = int(flagged["original_label"].is_not_null().sum())
    console.print(f"mislabels: {len(flagged)} flagged ({relabelled} relabelled, "
                  f"{int((flagged['keep']).sum())} kept for review)")
    estimate = estimate_text(result.mislabels)
    if estimate:
        console.print(f"           {estimate}")
    quality = {name: int(df[f"is_{name}_issue"].sum()) for name in QUALITY_CHECKS if f"is_{name}_issue" in df.columns}
    if quality:
        console.print("  quality: " + ", ".join(f"{n} {name.replace('_', ' ')}" for name, n in quality.items())
                      + f" ({int((df['status'] == 'low_quality').sum())} removed)")
    for warning in result.warnings:
        console.print(f"[yellow]warning:[/] {escape(warning)}")
    console.print(f"manifest: [bold]{result.manifest_path}[/]")
    console.print(f"report:   [bold]{result.report_path}[/]")



OutOpt = Annotated[Path, typer.Option("--out", help="The tree to fill: OUT/<label>/<file> and OUT/catalog.parquet.")]
RateOpt = Annotated[float, typer.Option(help="Requests per second over all connections.")]
ConcOpt = Annotated[int, typer.Option(help="Downloads at once.")]
TimeoutOpt = Annotated[float, typer.Option(help="Seconds before a request times out.")]
RetriesOpt = Annotated[int, typer.Option(help="Retries on 429, 5xx and broken connections (exponential backoff "
                                              "with jitter; Retry-After honoured).")]
MaxBytesOpt = Annotated[int, typer.Option(help="Largest response accepted, in bytes.")]
FileMaxBytesOpt = Annotated[int, typer.Option(
    "--max-bytes", help="Largest source file read, in bytes; a larger one becomes a failed row.")]
FollowOpt = Annotated[bool, typer.Option(
    "--follow-symlinks", help="Read files that symbolic links reach outside DIRECTORY (default: a failed row "
                              "saying where the link points).")]
AgentOpt = Annotated[str | None, typer.Option(help="User-Agent header (default: atelier's, naming the tool).")]


class IngestDisplay:
    """Per-source progress: pages listed, images placed, bytes, failures."""

    def __init__(self, bar, source: str):
        self.bar = bar
        self.source = source
        self.pages = self.images = self.failed = self.skipped = 0
        self.bytes = 0
        self.task = bar.add_task(self._text(), total=None)

    def _text(self) -> str:
        pages = f"{self.pages} pages, " if self.pages else ""  # local sources list no pages
        return (f"{self.source}: {pages}{self.images} images, {self.bytes / 1e6:.1f} MB, "
                f"{self.skipped} already there, {self.failed} failed")

    def __call__(self, kind: str, info: dict) -> None:
        if kind == "page":
            self.pages += 1
        elif kind == "item":
            if info["status"] == "ok":
                self.images += 1
                self.bytes += info.get("bytes", 0)
            elif info["status"] == "skipped":
                self.skipped += 1
            else:
                self.failed += 1
            self.bar.advance(self.task, 1)
        elif kind == "listing_failed":
            self.bar.console.print(f"[yellow]listing failed:[/] {escape(info['error'])}")
        self.bar.update(self.task, description=self._text())


def _run_ingest(source: str, make_items, out: Path, fetch: dict | None, link: bool = True) -> None:
    from curator.core.paths import display as shown
    from curator.ingest.catalog import run_ingest
    from curator.ingest.fetch import FetchSettings, PoliteClient

    try:
        settings = FetchSettings(**(fetch or {}))
        with PoliteClient(settings) as client, progress_bar() as bar:
            display = IngestDisplay(bar, source)
            result = run_ingest(make_items(client, display), out, client, concurrency=settings.concurrency,
                                link=link, events=display)
    except AtelierError as exc:
        raise fail(exc) from None
    table = Table(title=f"ingest {source} -> {escape(shown(str(out)))}")
    table.add_column("label")
    table.add_column("images added", justify="right")
    for label, n in sorted(result.by_label.items()):
        table.add_row(escape(label or "(none)"), str(n))
    console.print(table)
    console.print(f"added {result.added}, already there {result.skipped}, failed {result.failed}; "
                  f"{result.bytes / 1e6:.1f} MB downloaded")
    for reason, n in sorted(result.failures.items(), key=lambda kv: -kv[1]):
        console.print(f"  failed x{n}: {escape(reason)}")
    console.print(f"catalog: [bold]{escape(shown(str(result.catalog)))}[/]")


def _fetch_opts(rate, concurrency, timeout, retries, max_bytes, user_agent) -> dict:
    """The fetch settings of a network source; NaN or infinite --rate/--timeout are refused here (one line)."""
    import math

    for name, value in (("--rate", rate), ("--timeout", timeout)):
        if not math.isfinite(value) or value <= 0:
            raise fail(UsageError(f"{name} must be a positive number, got {value}"))
    opts = {"rate": rate, "concurrency": concurrency, "timeout": timeout, "retries": retries, "max_bytes": max_bytes}
    if user_agent:
        opts["user_agent"] = user_agent
    return opts


@ingest_app.command("wikiart")
def ingest_wikiart(
    out: OutOpt,
    style: Annotated[list[str] | None, typer.Option(help="A style, e.g. Impressionism (repeatable).")] = None,
    genre: Annotated[list[str] | None, typer.Option(help="A genre, e.g. portrait (repeatable).")] = None,
    artist: Annotated[list[str] | None, typer.Option(help="An artist URL name, e.g. claude-monet (repeatable).")]
    = None,
    artist_id: Annotated[list[str] | None, typer.Option(help="v2 API: an artist id (repeatable).")] = None,
    search: Annotated[list[str] | None, typer.Option(help="v2 API: a search term (repeatable).")] = None,
    limit_per_class: Annotated[int | None, typer.Option(help="At most this many images per style/genre/artist.")]
    = None,
    size: Annotated[str, typer.Option(help="Image variant: Large, Blog, PinterestLarge, PinterestSmall, HalfHD or "
                                           "original.")] = "Large",
    base_url: Annotated[str, typer.Option(help="WikiArt base URL (mirrors, tests).")] = "https://www.wikiart.org",
    image_base_url: Annotated[str | None, typer.Option(help="Fetch image paths from this base instead of "
                                                            "WikiArt's upload hosts.")] = None,
    rate: RateOpt = 2.0, concurrency: ConcOpt = 4, timeout: TimeoutOpt = 30.0, retries: RetriesOpt = 4,
    max_bytes: MaxBytesOpt = 50_000_000, user_agent: AgentOpt = None,
) -> None:
    """WikiArt by style, genre or artist (the site's JSON listings), or the v2 API (keys from WIKIART_ACCESS_KEY and
    WIKIART_SECRET_KEY when set)."""
    from curator.ingest.sources import WikiArtQuery, wikiart_items

    try:
        query = WikiArtQuery(tuple(style or ()), tuple(genre or ()), tuple(artist or ()), tuple(artist_id or ()),
                             tuple(search or ()), limit_per_class, size, base_url, image_base_url)
    except AtelierError as exc:
        raise fail(exc) from None
    _run_ingest("wikiart", lambda client, note: wikiart_items(client, query, note), out,
                _fetch_opts(rate, concurrency, timeout, retries, max_bytes, user_agent))


@ingest_app.command("pixiv")
def ingest_pixiv(
    out: OutOpt,
    ranking: Annotated[str | None, typer.Option(help="Ranking mode: day, week, month, ...")] = None,
    date: Annotated[str | None, typer.Option(help="Ranking date, YYYY-MM-DD.")] = None,
    user: Annotated[str | None, typer.Option(help="A user id: that artist's works.")] = None,
    tag: Annotated[str | None, typer.Option(help="A tag search.")] = None,
    label_by: Annotated[str, typer.Option(help="Folder per artist (user) or per tag.")] = "artist",
    allow_r18: Annotated[bool, typer.Option(help="Also fetch R-18 works (skipped by default).")] = False,
    limit: Annotated[int | None, typer.Option(help="At most this many works.")] = None,
    base_url: Annotated[str, typer.Option(help="App API base URL (tests, mirrors).")] = "https://app-api.pixiv.net",
    oauth_url: Annotated[str, typer.Option(help="OAuth base URL.")] = "https://oauth.secure.pixiv.net",
    image_base_url: Annotated[str | None, typer.Option(help="Fetch i.pximg.net paths from this base instead.")]
    = None,
    rate: RateOpt = 1.0, concurrency: ConcOpt = 2, timeout: TimeoutOpt = 30.0, retries: RetriesOpt = 4,
    max_bytes: MaxBytesOpt = 50_000_000, user_agent: AgentOpt = None,
) -> None:
    """Pixiv through the app API (OAuth refresh token in PIXIV_REFRESH_TOKEN): a ranking, a user's works or a tag
    search; multi-page works as one image per page; downloads send the Referer Pixiv's servers require."""
    import os

    from curator.ingest.sources import PixivQuery, pixiv_items

    try:
        query = PixivQuery(ranking, date, user, tag, label_by, allow_r18, limit, base_url, oauth_url,
                           image_base_url)
    except AtelierError as exc:
        raise fail(exc) from None
    token = os.environ.get("PIXIV_REFRESH_TOKEN")
    _run_ingest("pixiv", lambda client, note: pixiv_items(client, query, token, note), out,
                _fetch_opts(rate, concurrency, timeout, retries, max_bytes, user_agent))


@ingest_app.command("folder")
def ingest_folder(
    directory: Annotated[Path, typer.Argument(help="Class folders: DIR/<label>/<images>.")],
    out: OutOpt,
    group_pattern: Annotated[str | None, typer.Option(help="Regex on the file name; its first group is the artist.")]
    = None,
    link: Annotated[bool, typer.Option(help="Hard-link where possible (--no-link: always copy). Never moves.")]
    = True,
    max_bytes: FileMaxBytesOpt = DEFAULT_MAX_BYTES,
    follow_symlinks: FollowOpt = False,
) -> None:
    """Artist or class folders as they are, copied or hard-linked (never moved), verified by the safe loader. Only
    regular files are read; OUT is left out of the listing when it lies inside DIRECTORY."""
    from curator.ingest.sources import folder_items

    _run_ingest("folder", lambda client, note: folder_items(directory, group_pattern, exclude=[out],
                                                            max_bytes=max_bytes, follow_symlinks=follow_symlinks),
                out, None, link)


@ingest_app.command("artgan")
def ingest_artgan(
    directory: Annotated[Path, typer.Argument(help="The dump's image folder (Style/artist_title.jpg ...).")],
    out: OutOpt,
    csv_file: Annotated[Path, typer.Option("--csv", help="A split CSV, e.g. style_train.csv.")],
    classes: Annotated[Path | None, typer.Option(help="Class names, lines 'id Name' (default: style_class.txt "
                                                      "beside the CSV).")] = None,
    link: Annotated[bool, typer.Option(help="Hard-link where possible (--no-link: always copy).")] = True,
    max_bytes: FileMaxBytesOpt = DEFAULT_MAX_BYTES,
    follow_symlinks: FollowOpt = False,
) -> None:
    """The ArtGAN WikiArt dump: CSV lines `Style/artist_title.jpg,class_id`; the artist is the name before '_'."""
    from curator.ingest.sources import artgan_items

    _run_ingest("artgan", lambda client, note: artgan_items(directory, csv_file, classes, max_bytes=max_bytes,
                                                            follow_symlinks=follow_symlinks), out, None, link)


@ingest_app.command("parquet")
def ingest_parquet(
    file: Annotated[Path, typer.Argument(help="Parquet with image bytes (e.g. huggan/wikiart's layout).")],
    out: OutOpt,
    label_column: Annotated[str, typer.Option(help="Column whose (class) values are the labels.")] = "style",
    image_column: Annotated[str, typer.Option(help="Column with the image (struct with bytes, or bytes).")]
    = "image",
) -> None:
    """Hugging Face-style parquet: image bytes and class-id columns named by the file's metadata."""
    from curator.ingest.sources import parquet_items

    _run_ingest("parquet", lambda client, note: parquet_items(file, label_column, image_column), out, None)


def main() -> None:
    from curator import entry

    entry.main(app)


if __name__ == "__main__":
    main()
