"""A local HTTP server that imitates WikiArt's and Pixiv's endpoints (JSON in their real shapes, real image bytes)
and injects faults: 429 with Retry-After, 500, a connection dropped mid-body, HTML instead of an image, an oversized
body, a title with `../` and slashes, one image under two ids, and Pixiv's Referer check."""

from __future__ import annotations

import io
import json
import re
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit

import numpy as np
from PIL import Image

from tests.conftest import sample_paintings


def _jpeg(path, side: int = 160) -> bytes:
    im = Image.open(path).convert("RGB")
    im.thumbnail((side, side))
    buf = io.BytesIO()
    im.save(buf, "JPEG", quality=85)
    return buf.getvalue()


def _big_jpeg() -> bytes:
    rng = np.random.default_rng(0)
    buf = io.BytesIO()
    Image.fromarray(rng.integers(0, 255, (700, 700, 3), dtype=np.uint8)).save(buf, "JPEG", quality=98)
    return buf.getvalue()


class Services:
    """State and routes; `hits` counts requests per path, `delay` slows image responses (for kill tests)."""

    def __init__(self):
        paintings = sample_paintings(12)
        self.images = {f"img{i}": _jpeg(p) for i, p in enumerate(paintings)}
        self.images["dup"] = self.images["img0"]
        self.images["huge"] = _big_jpeg()
        self.hits: Counter = Counter()
        self.delay = 0.0
        self.failed_once: set[str] = set()
        self.lock = threading.Lock()
        self.base = ""  # set when the server starts

    # ---------------------------------------------------------------------------------------- WikiArt shapes
    def painting(self, cid: str, title: str, image: str, artist: str = "Claude Monet", year=1872) -> dict:
        return {"title": title, "contentId": int(cid) if cid.isdigit() else cid, "artistContentId": 211667,
                "artistName": artist, "completitionYear": year, "yearAsString": str(year), "width": 800,
                "height": 600, "image": f"https://uploads4.wikiart.org/images/{image}.jpg", "artistUrl": artist.lower().replace(" ", "-"),
                "url": title.lower().replace(" ", "-")}

    def style_pages(self) -> list[dict]:
        return [
            self.painting("1001", "Impression, Sunrise", "img0"),
            self.painting("1002", "Rate Limited Haystack", "ratelimited"),
            self.painting("1003", "Flaky Cathedral", "flaky"),
            self.painting("1004", "Dropped Bridge", "dropped"),
            self.painting("1005", "../../etc/passwd / a\\b", "img1"),
            self.painting("1006", "Not An Image", "html"),
            self.painting("1007", "Enormous", "huge"),
            self.painting("1008", "Same Picture Other Id", "dup"),
            self.painting("1009", "Lilies", "img2", artist="Berthe Morisot", year=1880),
        ]

    def route(self, handler: BaseHTTPRequestHandler) -> None:
        parts = urlsplit(handler.path)
        q = {k: v[0] for k, v in parse_qs(parts.query).items()}
        path = parts.path
        with self.lock:
            self.hits[path] += 1
        if path.startswith("/en/paintings-by-style/"):
            items, size = self.style_pages(), 4
            page = int(q.get("page", 1))
            return self.json(handler, {"Paintings": items[(page - 1) * size: page * size],
                                       "AllPaintingsCount": len(items), "PageSize": size, "Artists": None})
        if path == "/en/App/Painting/PaintingsByArtist":
            if q.get("json") != "2":
                return self.html(handler)
            return self.json(handler, [self.painting(str(2000 + i), f"Study {i}", f"img{3 + i}",
                                                     artist="Claude Monet") for i in range(3)])
        if path == "/en/api/2/login":
            return self.json(handler, {"SessionKey": "session-1"})
        if path == "/en/api/2/PaintingSearch":
            token = q.get("paginationToken")
            rows = [self.painting(str(3000 + i), f"Search hit {i}", f"img{6 + i}", artist="Paul Signac")
                    for i in range(4)]
            data = rows[:2] if not token else rows[2:]
            for row in data:
                row["id"] = str(row.pop("contentId"))
            return self.json(handler, {"data": data, "paginationToken": None if token else "tok-2",
                                       "hasMore": not token})
        if path.startswith("/images/"):
            return self.image(handler, path[len("/images/"):].split("!")[0].rsplit(".", 1)[0])
        # ---------------------------------------------------------------------------------------- Pixiv
        if path == "/auth/token" and handler.command == "POST":
            length = int(handler.headers.get("Content-Length", 0))
            form = {k: v[0] for k, v in parse_qs(handler.rfile.read(length).decode()).items()}
            if form.get("refresh_token") != "good-refresh" or form.get("grant_type") != "refresh_token":
                return self.json(handler, {"has_error": True, "errors": {"system": {"message": "invalid"}}}, 400)
            return self.json(handler, {"access_token": "access-1", "expires_in": 3600, "token_type": "bearer",
                                       "refresh_token": "good-refresh", "user": {"id": "1", "account": "me"}})
        if path.startswith("/v1/"):
            if handler.headers.get("Authorization") != "Bearer access-1":
                return self.json(handler, {"error": {"message": "Error occurred at the OAuth process."}}, 400)
            if path == "/v1/illust/ranking":
                if q.get("offset") == "30":
                    return self.json(handler, {"illusts": [self.illust(104, "Fourth", 2, 1)], "next_url": None})
                return self.json(handler, {
                    "illusts": [self.illust(101, "First", 1, 1), self.illust(102, "Two pages", 1, 2),
                                self.illust(103, "Adult", 2, 1, x_restrict=1)],
                    "next_url": "https://app-api.pixiv.net/v1/illust/ranking?mode=day&date=2024-05-01&offset=30"})
            if path == "/v1/user/illusts":
                return self.json(handler, {"illusts": [self.illust(201, "Mine", int(q["user_id"]), 1)],
                                           "next_url": None})
            if path == "/v1/search/illust":
                return self.json(handler, {"illusts": [self.illust(301, "Tagged", 3, 1)], "next_url": None})
        if path.startswith("/img-original/"):
            if handler.headers.get("Referer") != "https://app-api.pixiv.net/":
                return self.send(handler, 403, b"<html>403 Forbidden</html>", "text/html")
            m = re.match(r"px(\d+)_p(\d+)", path.rsplit("/", 1)[-1])
            return self.image(handler, f"img{int(m.group(1)) + int(m.group(2))}")
        return self.send(handler, 404, b"not found", "text/plain")

    def illust(self, iid: int, title: str, user: int, pages: int, x_restrict: int = 0) -> dict:
        def url(p):
            return f"https://i.pximg.net/img-original/img/2024/05/01/px{iid % 10}_p{p}.jpg"

        base = {"id": iid, "title": title, "type": "illust", "caption": "", "restrict": 0,
                "user": {"id": user, "name": f"Artist {user}", "account": f"artist{user}"},
                "tags": [{"name": "風景", "translated_name": "landscape"}, {"name": "oil"}],
                "create_date": "2024-05-01T10:00:00+09:00", "page_count": pages, "width": 800, "height": 600,
                "sanity_level": 2, "x_restrict": x_restrict,
                "image_urls": {"square_medium": url(0), "medium": url(0), "large": url(0)},
                "meta_single_page": {"original_image_url": url(0)} if pages == 1 else {},
                "meta_pages": [] if pages == 1 else [{"image_urls": {"original": url(p), "large": url(p)}}
                                                     for p in range(pages)]}
        return base

    # ---------------------------------------------------------------------------------------- responses
    def image(self, handler, name: str) -> None:
        if self.delay:
            time.sleep(self.delay)
        first = False
        with self.lock:
            if name not in self.failed_once:
                self.failed_once.add(name)
                first = True
        if name == "ratelimited" and first:
            return self.send(handler, 429, b"slow down", "text/plain", {"Retry-After": "1"})
        if name == "flaky" and first:
            return self.send(handler, 500, b"oops", "text/plain")
        body = self.images.get(name) or self.images.get("img" + name[-1:] if name[-1:].isdigit() else "img0",
                                                        self.images["img0"])
        if name in ("ratelimited", "flaky", "dropped"):
            body = self.images["img9"] if name == "ratelimited" else self.images["img10"] if name == "flaky" \
                else self.images["img11"]
        if name == "dropped" and first:
            handler.send_response(200)
            handler.send_header("Content-Type", "image/jpeg")
            handler.send_header("Content-Length", str(len(body)))
            handler.end_headers()
            handler.wfile.write(body[: len(body) // 2])
            handler.wfile.flush()
            handler.close_connection = True
            return None
        if name == "html":
            return self.html(handler)
        return self.send(handler, 200, body, "image/jpeg")

    def html(self, handler) -> None:
        return self.send(handler, 200, b"<!DOCTYPE html><html><body>Sign in to continue</body></html>", "text/html")

    def json(self, handler, obj, status: int = 200) -> None:
        return self.send(handler, status, json.dumps(obj).encode(), "application/json")

    def send(self, handler, status: int, body: bytes, ctype: str, headers: dict | None = None) -> None:
        handler.send_response(status)
        handler.send_header("Content-Type", ctype)
        handler.send_header("Content-Length", str(len(body)))
        for k, v in (headers or {}).items():
            handler.send_header(k, v)
        handler.end_headers()
        handler.wfile.write(body)


def serve(services: Services) -> tuple[ThreadingHTTPServer, str]:
    class Handler(BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self):
            services.route(self)

        do_POST = do_GET

        def log_message(self, *args):
            pass

    class Server(ThreadingHTTPServer):
        def handle_error(self, request, client_address):
            # a client closing a kept-alive connection resets it: not a fault of the code under test, and the
            # default report (a traceback on sys.stderr) would land in whatever output a CliRunner is capturing
            import sys

            if not isinstance(sys.exc_info()[1], ConnectionError):
                super().handle_error(request, client_address)

    server = Server(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    base = f"http://127.0.0.1:{server.server_address[1]}"
    services.base = base
    threading.Thread(target=server.serve_forever, daemon=True).start()
    return server, base

