"""Where `curator ingest` gets images: WikiArt, Pixiv, class folders, the ArtGAN WikiArt dump, Hugging Face parquet.

Each source is a function that checks its arguments at once (a missing folder, CSV or class file, a bad regex, a
parquet whose columns have the wrong types, a refused login: one-line `UsageError`s, before OUT is touched) and
returns an iterator of `curator.ingest.catalog.Item`s, listing lazily (page by page, row group by row group) so that a
large source never sits in memory. Network sources take a `PoliteClient` and a base URL that tests and mirrors
override; the JSON they read is in the shapes the services send (field names as they spell them).
"""

from __future__ import annotations

import csv
import os
import re
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from curator.core.errors import UsageError
from curator.core.images import DEFAULT_MAX_BYTES, ReadPolicy, inside, iter_files, looks_like_image
from curator.core.paths import display, relative_text, to_text
from curator.ingest.catalog import Item
from curator.ingest.fetch import FetchError, PoliteClient

Note = Callable[[str, dict], None]
WIKIART_BASE = "https://www.wikiart.org"
WIKIART_SIZES = ("Large", "Blog", "PinterestLarge", "PinterestSmall", "HalfHD", "original")
PIXIV_API = "https://app-api.pixiv.net"
PIXIV_OAUTH = "https://oauth.secure.pixiv.net"
# The public client credentials of Pixiv's own mobile app, which every app-API client sends with a refresh token.
PIXIV_CLIENT_ID = "MOBrBDS8blbauoSck0ZfDbtuzpyT"
PIXIV_CLIENT_SECRET = "lsACyCD94FhDUtGTXi3QzcFE2uU1hqtDaKeqrdwj"
PIXIV_REFERER = "https://app-api.pixiv.net/"


def _noop(kind: str, info: dict) -> None:
    return None


def slug(text: str) -> str:
    """WikiArt's URL form of a style, genre or artist name: lower case, words joined by '-'."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-")


# ------------------------------------------------------------------------------------------------------ WikiArt


@dataclass(frozen=True)
class WikiArtQuery:
    styles: tuple[str, ...] = ()
    genres: tuple[str, ...] = ()
    artists: tuple[str, ...] = ()
    artist_ids: tuple[str, ...] = ()  # v2 API: PaintingsByArtist?id=
    searches: tuple[str, ...] = ()  # v2 API: PaintingSearch?term=
    limit_per_class: int | None = None
    size: str = "Large"
    base_url: str = WIKIART_BASE
    image_base_url: str | None = None  # serve image paths from here instead of WikiArt's upload hosts

    def __post_init__(self) -> None:
        if not (self.styles or self.genres or self.artists or self.artist_ids or self.searches):
            raise UsageError("say what to fetch: --style, --genre, --artist, --artist-id or --search")
        if self.size not in WIKIART_SIZES:
            raise UsageError(f"--size must be one of {', '.join(WIKIART_SIZES)}")


def wikiart_image_url(image: str, size: str) -> str:
    """The size variant of a WikiArt image URL: WikiArt serves `...jpg!Large.jpg`; `original` drops the suffix."""
    base = image.split("!", 1)[0]
    if size == "original":
        return base
    ext = os.path.splitext(urlsplit(base).path)[1] or ".jpg"
    return f"{base}!{size}{ext}"


def _wikiart_item(p: dict, label: str, query: WikiArtQuery, style: str | None = None,
                  genre: str | None = None) -> Item | None:
    image = p.get("image")
    sid = p.get("contentId") or p.get("id")
    if not image or sid is None:
        return None
    artist = p.get("artistName")
    year = p.get("completitionYear") or p.get("yearAsString")
    return Item(source="wikiart", source_id=str(sid), label=label,
                group=p.get("artistUrl") or (slug(artist) if artist else None),
                url=rebase(wikiart_image_url(image, query.size), query.image_base_url), title=p.get("title"),
                artist=artist,
                year=None if year in (None, "") else str(year), style=style, genre=genre)


def wikiart_items(client: PoliteClient, query: WikiArtQuery, note: Note = _noop) -> Iterator[Item]:
    """Paintings by style or genre (paginated `json=2` listings), by artist (the per-artist `json=2` list), or through
    the v2 API (`paginationToken`/`hasMore`; a session key from WIKIART_ACCESS_KEY/WIKIART_SECRET_KEY when set, asked
    for at once so that a refused login is an error before anything is written)."""
    base = query.base_url.rstrip("/")
    session = _wikiart_session(client, base) if query.artist_ids or query.searches else None
    return _wikiart_listing(client, query, base, session, note)


def _wikiart_listing(client: PoliteClient, query: WikiArtQuery, base: str, session: str | None,
                     note: Note) -> Iterator[Item]:
    for kind, names in (("style", query.styles), ("genre", query.genres)):
        for name in names:
            taken, page = 0, 1
            while query.limit_per_class is None or taken < query.limit_per_class:
                url = f"{base}/en/paintings-by-{kind}/{slug(name)}"
                data = _listing(client, url, {"json": 2, "page": page}, note)
                paintings = (data or {}).get("Paintings") or []
                note("page", {"source": "wikiart", "what": f"{kind} {name} page {page}", "items": len(paintings)})
                if not paintings:
                    break
                for p in paintings:
                    item = _wikiart_item(p, name, query, **{kind: name})
                    if item is not None and (query.limit_per_class is None or taken < query.limit_per_class):
                        taken += 1
                        yield item
                total, size = data.get("AllPaintingsCount"), data.get("PageSize") or len(paintings)
                if total is not None and page * size >= int(total):
                    break
                page += 1
    for artist in query.artists:
        data = _listing(client, f"{base}/en/App/Painting/PaintingsByArtist", {"artistUrl": slug(artist), "json": 2},
                        note)
        paintings = data if isinstance(data, list) else []
        note("page", {"source": "wikiart", "what": f"artist {artist}", "items": len(paintings)})
        for p in paintings[: query.limit_per_class]:
            item = _wikiart_item({**p, "artistUrl": p.get("artistUrl") or slug(artist)}, slug(artist), query)
            if item is not None:
                yield item
    if query.artist_ids or query.searches:
        params: dict = {}
        if session:
            params["authSessionKey"] = session
        jobs = [("PaintingsByArtist", {"id": a}, a) for a in query.artist_ids]
        jobs += [("PaintingSearch", {"term": t}, t) for t in query.searches]
        for endpoint, extra, label in jobs:
            token, taken = None, 0
            while True:
                page_params = {**params, **extra, **({"paginationToken": token} if token else {})}
                data = _listing(client, f"{base}/en/api/2/{endpoint}", page_params, note) or {}
                rows = data.get("data") or []
                note("page", {"source": "wikiart", "what": f"{endpoint} {label}", "items": len(rows)})
                for p in rows:
                    if query.limit_per_class is not None and taken >= query.limit_per_class:
                        break
                    item = _wikiart_item(p, p.get("artistUrl") if endpoint == "PaintingsByArtist" else label, query)
                    if item is not None:
                        taken += 1
                        yield item
                token = data.get("paginationToken")
                if not data.get("hasMore") or not token or (query.limit_per_class is not None
                                                             and taken >= query.limit_per_class):
                    break


def _wikiart_session(client: PoliteClient, base: str) -> str | None:
    access, secret = os.environ.get("WIKIART_ACCESS_KEY"), os.environ.get("WIKIART_SECRET_KEY")
    if not (access and secret):
        return None
    try:
        data = client.get_json(f"{base}/en/api/2/login", params={"accessCode": access, "secretCode": secret})
    except FetchError as exc:
        raise UsageError(f"WikiArt login with WIKIART_ACCESS_KEY/WIKIART_SECRET_KEY failed: {exc}") from None
    return (data or {}).get("SessionKey")


def _listing(client: PoliteClient, url: str, params: dict, note: Note):
    try:
        return client.get_json(url, params=params)
    except FetchError as exc:
        note("listing_failed", {"url": url, "error": str(exc)})
        return None


# ------------------------------------------------------------------------------------------------------ Pixiv


@dataclass(frozen=True)
class PixivQuery:
    ranking: str | None = None  # day | week | month | day_male | ...
    date: str | None = None
    user: str | None = None
    tag: str | None = None
    label_by: str = "artist"  # artist | tag
    allow_r18: bool = False
    limit: int | None = None
    api_base: str = PIXIV_API
    oauth_base: str = PIXIV_OAUTH
    image_base: str | None = None  # serve i.pximg.net paths from here (mirrors, tests)

    def __post_init__(self) -> None:
        if sum(x is not None for x in (self.ranking, self.user, self.tag)) != 1:
            raise UsageError("say exactly one of --ranking, --user or --tag")
        if self.label_by not in ("artist", "tag"):
            raise UsageError("--label-by must be artist or tag")
        if self.date is not None and not re.fullmatch(r"\d{4}-\d{2}-\d{2}", self.date):
            raise UsageError("--date must be YYYY-MM-DD")


def pixiv_token(client: PoliteClient, refresh_token: str | None, oauth_base: str = PIXIV_OAUTH) -> str:
    """An access token for the app API from an OAuth refresh token (PIXIV_REFRESH_TOKEN)."""
    if not refresh_token:
        raise UsageError("Pixiv needs an OAuth refresh token in PIXIV_REFRESH_TOKEN")
    try:
        data = client.post_json(f"{oauth_base.rstrip('/')}/auth/token", data={
            "client_id": PIXIV_CLIENT_ID, "client_secret": PIXIV_CLIENT_SECRET, "grant_type": "refresh_token",
            "refresh_token": refresh_token, "include_policy": "true", "get_secure_url": "1"})
    except FetchError as exc:
        raise UsageError(f"Pixiv login with PIXIV_REFRESH_TOKEN failed: {exc}") from None
    token = (data or {}).get("access_token") or ((data or {}).get("response") or {}).get("access_token")
    if not token:
        raise UsageError("Pixiv login answered without an access_token")
    return token


def rebase(url: str, base: str | None) -> str:
    """`url`'s path and query on another base (a mirror or a test server); `url` itself when `base` is None."""
    if not base:
        return url
    parts = urlsplit(url)
    return f"{base.rstrip('/')}{parts.path}" + (f"?{parts.query}" if parts.query else "")


def pixiv_items(client: PoliteClient, query: PixivQuery, refresh_token: str | None,
                note: Note = _noop) -> Iterator[Item]:
    """Works of a ranking, a user, or a tag search; every page of a multi-page work is its own item. The login
    happens at once, so that a refused token is an error before anything is written."""
    token = pixiv_token(client, refresh_token, query.oauth_base)
    return _pixiv_listing(client, query, token, note)


def _pixiv_listing(client: PoliteClient, query: PixivQuery, token: str, note: Note) -> Iterator[Item]:
    headers = {"Authorization": f"Bearer {token}", "App-OS": "ios", "App-OS-Version": "14.6",
               "Accept-Language": "en-us"}
    base = query.api_base.rstrip("/")
    if query.ranking:
        url = f"{base}/v1/illust/ranking"
        params = {"mode": query.ranking, "filter": "for_ios", **({"date": query.date} if query.date else {})}
    elif query.user:
        url, params = f"{base}/v1/user/illusts", {"user_id": query.user, "type": "illust", "filter": "for_ios"}
    else:
        url = f"{base}/v1/search/illust"
        params = {"word": query.tag, "search_target": "partial_match_for_tags", "sort": "date_desc",
                  "filter": "for_ios"}
    works = 0
    while url:
        try:
            data = client.get_json(url, params=params, headers=headers)
        except FetchError as exc:
            note("listing_failed", {"url": url, "error": str(exc)})
            return
        illusts = data.get("illusts") or []
        note("page", {"source": "pixiv", "what": urlsplit(url).path, "items": len(illusts)})
        for illust in illusts:
            if query.limit is not None and works >= query.limit:
                return
            if illust.get("x_restrict", 0) and not query.allow_r18:
                note("skipped", {"source": "pixiv", "why": "R-18", "id": illust.get("id")})
                continue
            works += 1
            yield from _pixiv_pages(illust, query)
        next_url = data.get("next_url")
        url, params = (rebase(next_url, base), None) if next_url else (None, None)


def _pixiv_pages(illust: dict, query: PixivQuery) -> Iterator[Item]:
    user = illust.get("user") or {}
    tags = [t.get("name") for t in illust.get("tags") or [] if t.get("name")]
    if query.label_by == "tag":
        label = query.tag if query.tag else (tags[0] if tags else "untagged")
    else:
        label = user.get("account") or str(user.get("id") or "unknown")
    if illust.get("page_count", 1) <= 1 or not illust.get("meta_pages"):
        urls = [(illust.get("meta_single_page") or {}).get("original_image_url")
                or (illust.get("image_urls") or {}).get("large")]
    else:
        urls = [(page.get("image_urls") or {}).get("original") or (page.get("image_urls") or {}).get("large")
                for page in illust["meta_pages"]]
    for index, url in enumerate(urls):
        yield Item(source="pixiv", source_id=f"{illust.get('id')}_p{index}", label=label,
                   group=str(user.get("id")) if user.get("id") is not None else None,
                   url=rebase(url, query.image_base) if url else None,
                   headers={"Referer": PIXIV_REFERER}, title=illust.get("title"), artist=user.get("name"),
                   year=(illust.get("create_date") or "")[:4] or None, tags=tags,
                   error=None if url else "work lists no image URL")


# ------------------------------------------------------------------------------------------------------ local


def compile_group_pattern(pattern: str | None) -> re.Pattern | None:
    """`--group-pattern` compiled, or a one-line `UsageError` naming what is wrong with it."""
    if not pattern:
        return None
    try:
        return re.compile(pattern)
    except re.error as exc:
        raise UsageError(f"--group-pattern {pattern!r} is not a valid regular expression: {exc}") from None


def local_policy(root: Path, max_bytes: int = DEFAULT_MAX_BYTES, follow_symlinks: bool = False) -> ReadPolicy:
    """How a local source's files are read: regular files only, at most `max_bytes`, and symbolic links that leave
    `root` not followed unless `follow_symlinks`."""
    if isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes < 1:
        raise UsageError(f"--max-bytes must be a positive number of bytes, got {max_bytes!r}")
    return ReadPolicy(root=Path(root), max_bytes=max_bytes, follow_symlinks=follow_symlinks)


def _source_folder(root: Path, what: str) -> Path:
    root = Path(root)
    if not root.exists():
        raise UsageError(f"{what} {display(str(root))} does not exist")
    if not root.is_dir():
        raise UsageError(f"{what} {display(str(root))} is not a folder")
    return root


def folder_items(root: Path, group_pattern: str | None = None, *, exclude: Iterable[Path] = (),
                 max_bytes: int = DEFAULT_MAX_BYTES, follow_symlinks: bool = False) -> Iterator[Item]:
    """Class folders as they are: label = first folder under ROOT, group from `group_pattern` on the file name; the
    file's name is kept (`Item.name`), its path under ROOT is the `source_id`.

    Every image-looking entry becomes an item (FIFOs and sockets named like images too: they become failed rows,
    never read), and so does every symbolic link that leaves ROOT (a failed row saying where it points, unless
    `follow_symlinks`). `exclude` folders (the ingest's own OUT when it lies inside ROOT) are not listed. A name that
    is not valid UTF-8 gives an escaped `source_id` (`Item.escaped`).
    """
    root = _source_folder(root, "source folder")
    pattern = compile_group_pattern(group_pattern)
    policy = local_policy(root, max_bytes, follow_symlinks)
    return _folder_listing(root, pattern, tuple(exclude), policy)


def _folder_listing(root: Path, pattern: re.Pattern | None, exclude: tuple[Path, ...],
                    policy: ReadPolicy) -> Iterator[Item]:
    for path in iter_files(root, exclude, policy.follow_symlinks):
        leaves = not policy.follow_symlinks and os.path.islink(path) and not inside(path, root)
        if not leaves and not looks_like_image(path):
            continue
        rel, escaped = relative_text(path, root)
        raw = path.relative_to(root).as_posix()
        label = raw.split("/", 1)[0] if "/" in raw else None
        m = pattern.search(path.name) if pattern else None
        yield Item(source="folder", source_id=rel, label=label,
                   group=(m.group(1) if m and pattern.groups else m.group(0) if m else None),
                   local=path, title=path.stem, artist=m.group(1) if m and pattern.groups else None,
                   escaped=escaped, policy=policy, name=path.name)


def read_class_names(path: Path) -> dict[str, str]:
    """`id Name` lines (ArtGAN's style_class.txt) as {id: name}; a missing or unreadable file is a `UsageError`."""
    path = Path(path)
    if not path.is_file():
        raise UsageError(f"--classes {display(str(path))} does not exist or is not a file")
    try:
        text = path.read_text(encoding="utf-8", errors="surrogateescape")
    except OSError as exc:
        raise UsageError(f"--classes {display(str(path))} cannot be read: {exc.strerror or exc}") from None
    names = {}
    for line in text.splitlines():
        line = line.strip()
        if line:
            key, _, name = line.partition(" ")
            names[key] = name.strip() or key
    return names


def artgan_items(root: Path, csv_path: Path, classes: Path | None = None, *, max_bytes: int = DEFAULT_MAX_BYTES,
                 follow_symlinks: bool = False) -> Iterator[Item]:
    """The ArtGAN WikiArt dump: CSV lines `Style/artist_title.jpg,class_id`; the artist is the file name before the
    first `_`, the title what follows it, and the file name is kept (`Item.name`). A line naming a missing file, or
    a path that leaves the dump (`..`, absolute), becomes a failed row; files are read through
    `local_policy(root, ...)`. CSV bytes that are not UTF-8 name files as the OS does."""
    root, csv_path = _source_folder(root, "dump folder"), Path(csv_path)
    if not csv_path.is_file():
        raise UsageError(f"--csv {display(str(csv_path))} does not exist or is not a file")
    if classes is None:
        beside = [p for p in (csv_path.parent / f"{csv_path.stem.split('_')[0]}_class.txt",) if p.is_file()]
        classes = beside[0] if beside else None
    names = read_class_names(classes) if classes else {}
    if not names:
        raise UsageError(f"no class names: put {csv_path.stem.split('_')[0]}_class.txt beside {csv_path.name} or "
                         f"pass --classes FILE")
    return _artgan_listing(root, csv_path, names, local_policy(root, max_bytes, follow_symlinks))


def _artgan_listing(root: Path, csv_path: Path, names: dict[str, str], policy: ReadPolicy) -> Iterator[Item]:
    with open(csv_path, newline="", encoding="utf-8", errors="surrogateescape") as fh:
        try:
            for line_no, row in enumerate(csv.reader(fh), 1):
                if not row or len(row) < 2:
                    continue
                item = _artgan_item(root, row[0].strip(), row[1].strip(), line_no, names, policy)
                if item is not None:
                    yield item
        except csv.Error as exc:
            raise UsageError(f"--csv {display(str(csv_path))} is not a readable CSV ({exc})") from None


def _artgan_item(root: Path, rel: str, class_id: str, line_no: int, names: dict[str, str],
                 policy: ReadPolicy) -> Item | None:
    if not class_id.isdigit() and line_no == 1:
        return None  # a header line
    label = names.get(class_id)
    file_name = rel.rsplit("/", 1)[-1]
    artist = file_name.split("_", 1)[0] if "_" in file_name else None
    title = os.path.splitext(file_name.split("_", 1)[1] if "_" in file_name else file_name)[0]
    target = root / rel
    error = None
    if label is None:
        error = f"class id {class_id} is not in the class names"
    elif ".." in Path(rel).parts or Path(rel).is_absolute():
        error = "path leaves the dump folder"
    elif not os.path.lexists(target):
        error = "file is missing"
    source_id, escaped = to_text(rel)
    return Item(source="artgan", source_id=source_id, label=label, group=artist, local=target, title=title,
                artist=artist, style=label, error=error, escaped=escaped, policy=policy, name=file_name)


def parquet_items(path: Path, label_column: str = "style", image_column: str = "image") -> Iterator[Item]:
    """Hugging Face-style parquet (e.g. huggan/wikiart): image bytes plus class-id columns whose names are in the
    file's `huggingface` metadata; read one row group at a time. The file name in an image's `path` is kept
    (`Item.name`); a row without one is named from its title and id.

    The columns are checked at once: the image column must hold bytes (binary, or a struct with a binary `bytes`
    field) and the label column class ids (integers) or text; anything else is a one-line `UsageError`, never a
    silently wrong label. A class id outside the ClassLabel names gives a failed row.
    """
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = Path(path)
    if not path.is_file():
        raise UsageError(f"{display(str(path))} does not exist or is not a file")
    try:
        fh = open(path, "rb")  # a file object: arrow refuses paths that are not valid UTF-8; the listing closes it
    except OSError as exc:
        raise UsageError(f"{display(str(path))} cannot be read: {exc.strerror or exc}") from None
    try:
        pf = pq.ParquetFile(fh)
        schema = pf.schema_arrow
        names = _check_parquet(path, schema, label_column, image_column)
    except (OSError, ValueError, pa.ArrowException) as exc:
        fh.close()
        raise UsageError(f"{display(str(path))} is not a readable parquet file: {_one_line(exc)}") from None
    except UsageError:
        fh.close()
        raise
    return _parquet_rows(pf, fh, path, to_text(path.name), label_column, image_column, names)


def _check_parquet(path: Path, schema, label_column: str, image_column: str) -> dict[str, list[str] | None]:
    """The ClassLabel names of the label, artist, genre and style columns, once the columns are checked."""
    columns = schema.names
    if image_column not in columns:
        raise UsageError(f"{display(str(path))} has no {image_column!r} column (columns: {', '.join(columns)})")
    if label_column not in columns:
        raise UsageError(f"{display(str(path))} has no label column {label_column!r} (columns: "
                         f"{', '.join(columns)})")
    image_type, label_type = schema.field(image_column).type, schema.field(label_column).type
    if not _holds_bytes(image_type):
        raise UsageError(f"{display(str(path))}: image column {image_column!r} holds {image_type}, expected bytes "
                         f"(binary, or a struct with a binary 'bytes' field)")
    if not _holds_labels(label_type):
        raise UsageError(f"{display(str(path))}: label column {label_column!r} holds {label_type}, expected class "
                         f"ids (integers) or text")
    features = _hf_features(schema.metadata or {})

    def names_of(column: str) -> list[str] | None:
        feature = features.get(column) or {}
        names = feature.get("names") if isinstance(feature, dict) and feature.get("_type") == "ClassLabel" else None
        return [str(n) for n in names] if isinstance(names, list) else None

    return {c: names_of(c) for c in {label_column, "artist", "genre", "style"}}


def _parquet_rows(pf, fh, path: Path, file_id: tuple[str, bool], label_column: str, image_column: str,
                  names: dict[str, list[str] | None]) -> Iterator[Item]:
    with fh:
        yield from _parquet_batches(pf, path, file_id, label_column, image_column, names)


def _parquet_batches(pf, path: Path, file_id: tuple[str, bool], label_column: str, image_column: str,
                     names: dict[str, list[str] | None]) -> Iterator[Item]:
    import pyarrow as pa

    row = 0
    batches = pf.iter_batches(batch_size=256)
    while True:
        try:
            batch = next(batches)
        except StopIteration:
            return
        except (OSError, ValueError, pa.ArrowException) as exc:
            raise UsageError(f"{display(str(path))} cannot be read past row {row}: {_one_line(exc)}") from None
        data = batch.to_pydict()
        for i in range(batch.num_rows):
            image = data[image_column][i]
            blob = image.get("bytes") if isinstance(image, dict) else image
            name = image.get("path") if isinstance(image, dict) else None
            label, error = _label_cell(data[label_column][i], label_column, names[label_column])
            artist = _cell(data, "artist", i, names["artist"])
            yield Item(source="parquet", source_id=f"{file_id[0]}:{row}", label=label, group=artist, data=blob,
                       title=os.path.splitext(name)[0] if isinstance(name, str) and name else None, artist=artist,
                       style=_cell(data, "style", i, names["style"]), genre=_cell(data, "genre", i, names["genre"]),
                       error=error or (None if blob else "row has no image bytes"), escaped=file_id[1],
                       name=name.replace("\\", "/").rsplit("/", 1)[-1] if isinstance(name, str) and name else None)
            row += 1


def _one_line(exc: BaseException) -> str:
    lines = str(exc).strip().splitlines()
    return (lines[0] if lines else type(exc).__name__)[:160]


def _holds_bytes(t) -> bool:
    import pyarrow as pa

    if pa.types.is_binary(t) or pa.types.is_large_binary(t):
        return True
    if pa.types.is_struct(t):
        index = t.get_field_index("bytes")
        return index >= 0 and _holds_bytes(t.field(index).type) and not pa.types.is_struct(t.field(index).type)
    return False


def _holds_labels(t) -> bool:
    import pyarrow as pa

    if pa.types.is_dictionary(t):
        t = t.value_type
    return pa.types.is_integer(t) or pa.types.is_string(t) or pa.types.is_large_string(t)


def _hf_features(meta: dict) -> dict:
    """The `info.features` of the file's `huggingface` metadata; {} when absent or unreadable."""
    import json

    try:
        info = json.loads(meta.get(b"huggingface", b"{}"))
        features = (info.get("info") or {}).get("features") or {}
    except (ValueError, AttributeError):
        return {}
    return features if isinstance(features, dict) else {}


def _label_cell(v, column: str, names: list[str] | None) -> tuple[str | None, str | None]:
    """(label, None), or (None, why) for a class id that the ClassLabel names do not cover."""
    if v is None:
        return None, None
    if names is not None and isinstance(v, int):
        if 0 <= v < len(names):
            return names[v], None
        return None, f"class id {v} of {column!r} is not among its {len(names)} class names"
    return str(v), None


def _cell(data: dict, column: str, i: int, names: list[str] | None) -> str | None:
    """A class-id cell as its name (from the ClassLabel names), any other cell as text."""
    if column not in data or data[column][i] is None:
        return None
    v = data[column][i]
    return names[v] if names is not None and isinstance(v, int) and 0 <= v < len(names) else str(v)
