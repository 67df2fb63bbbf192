"""Where `curator ingest` gets images: WikiArt, Pixiv, class folders, the ArtGAN WikiArt dump, Hugging Face parquet.

Each source is a generator of `curator.ingest.Item`s, listing lazily (page by page, row group by row group) so that a
large source never sits in memory. Network sources take a `PoliteClient` and a base URL that tests and mirrors
override; the JSON they read is in the shapes the services send (field names as they spell them).
"""

from __future__ import annotations

import csv
import os
import re
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from urllib.parse import urlsplit

from curator.errors import UsageError
from curator.fetch import FetchError, PoliteClient
from curator.images import iter_files, looks_like_image
from curator.ingest import Item

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
    the v2 API (`paginationToken`/`hasMore`; a session key from WIKIART_ACCESS_KEY/WIKIART_SECRET_KEY when set)."""
    base = query.base_url.rstrip("/")
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
        session = _wikiart_session(client, base)
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
    """Works of a ranking, a user, or a tag search; every page of a multi-page work is its own item."""
    token = pixiv_token(client, refresh_token, query.oauth_base)
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


def folder_items(root: Path, group_pattern: str | None = None) -> Iterator[Item]:
    """Class folders as they are: label = first folder under ROOT, group from `group_pattern` on the file name."""
    root = Path(root)
    if not root.is_dir():
        raise UsageError(f"{root} is not a folder")
    pattern = re.compile(group_pattern) if group_pattern else None
    for path in iter_files(root):
        if not looks_like_image(path):
            continue
        rel = path.relative_to(root).as_posix()
        label = rel.split("/", 1)[0] if "/" in rel else None
        m = pattern.search(path.name) if pattern else None
        yield Item(source="folder", source_id=rel, label=label,
                   group=(m.group(1) if m and pattern.groups else m.group(0) if m else None),
                   local=path, title=path.stem, artist=m.group(1) if m and pattern.groups else None)


def read_class_names(path: Path) -> dict[str, str]:
    """`id Name` lines (ArtGAN's style_class.txt) as {id: name}."""
    names = {}
    for line in Path(path).read_text(encoding="utf-8").splitlines():
        line = line.strip()
        if line:
            key, _, name = line.partition(" ")
            names[key] = name.strip() or key
    return names


def artgan_items(root: Path, csv_path: Path, classes: Path | None = None) -> Iterator[Item]:
    """The ArtGAN WikiArt dump: CSV lines `Style/artist_title.jpg,class_id`; the artist is the file name before the
    first `_`. A line naming a missing file becomes a failed row."""
    root, csv_path = Path(root), Path(csv_path)
    if not csv_path.is_file():
        raise UsageError(f"--csv {csv_path} does not exist")
    if classes is None:
        beside = [p for p in (csv_path.parent / f"{csv_path.stem.split('_')[0]}_class.txt",) if p.is_file()]
        classes = beside[0] if beside else None
    names = read_class_names(classes) if classes else {}
    if not names:
        raise UsageError(f"no class names: put {csv_path.stem.split('_')[0]}_class.txt beside {csv_path.name} or "
                         f"pass --classes FILE")
    with open(csv_path, newline="", encoding="utf-8") as fh:
        for line_no, row in enumerate(csv.reader(fh), 1):
            if not row or len(row) < 2:
                continue
            rel, class_id = row[0].strip(), row[1].strip()
            if not class_id.isdigit() and line_no == 1:
                continue  # a header line
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
            elif not target.is_file():
                error = "file is missing"
            yield Item(source="artgan", source_id=rel, label=label, group=artist, local=target, title=title,
                       artist=artist, style=label, error=error)


def parquet_items(path: Path, label_column: str = "style", image_column: str = "image") -> Iterator[Item]:
    """Hugging Face-style parquet (e.g. huggan/wikiart): image bytes plus class-id columns whose names are in the
    file's `huggingface` metadata; read one row group at a time."""
    import json

    import pyarrow.parquet as pq

    path = Path(path)
    if not path.is_file():
        raise UsageError(f"{path} does not exist")
    try:
        pf = pq.ParquetFile(path)
    except Exception as exc:  # noqa: BLE001 - pyarrow raises several types for a non-parquet file
        raise UsageError(f"{path} is not a readable parquet file: {str(exc)[:120]}") from None
    columns = pf.schema_arrow.names
    if image_column not in columns:
        raise UsageError(f"{path} has no {image_column!r} column (columns: {', '.join(columns)})")
    if label_column not in columns:
        raise UsageError(f"{path} has no label column {label_column!r} (columns: {', '.join(columns)})")
    meta = pf.schema_arrow.metadata or {}
    features = {}
    if b"huggingface" in meta:
        info = json.loads(meta[b"huggingface"])
        features = (info.get("info") or {}).get("features") or {}

    def names_of(column: str) -> list[str] | None:
        feature = features.get(column) or {}
        return feature.get("names") if feature.get("_type") == "ClassLabel" else None

    label_names, artist_names, genre_names = names_of(label_column), names_of("artist"), names_of("genre")
    style_names = names_of("style")
    row = 0
    for batch in pf.iter_batches(batch_size=256):
        data = batch.to_pydict()
        for i in range(batch.num_rows):
            image = data[image_column][i]
            blob = image.get("bytes") if isinstance(image, dict) else image
            name = image.get("path") if isinstance(image, dict) else None

            label = _cell(data, label_column, i, label_names)
            artist = _cell(data, "artist", i, artist_names)
            yield Item(source="parquet", source_id=f"{path.name}:{row}", label=label, group=artist, data=blob,
                       title=os.path.splitext(name)[0] if name else None, artist=artist,
                       style=_cell(data, "style", i, style_names), genre=_cell(data, "genre", i, genre_names),
                       error=None if blob else "row has no image bytes")
            row += 1


def _cell(data: dict, column: str, i: int, names: list[str] | None) -> str | None:
    """A class-id cell as its name (from the ClassLabel names), any other cell as text."""
    if column not in data or data[column][i] is None:
        return None
    v = data[column][i]
    return names[v] if names is not None and isinstance(v, int) and 0 <= v < len(names) else str(v)
