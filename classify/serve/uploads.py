"""Multipart uploads, read into memory under bounds: nothing is written to disk, no file is held past `max_bytes`.

Starlette's own form parser spools large files to temporary files and knows their size only at the end; here the
body is streamed through python-multipart's parser and each part is kept in memory only while it stays within
`max_bytes` (beyond that its bytes are counted and dropped, and the part becomes a "too large" row). The request as a
whole is bounded too (`max_files` parts of at most `max_bytes`, plus room for the form's framing), by its
Content-Length when it gives one and while streaming in any case, and so are all requests together: the bytes held
at once across requests come out of one `Budget`, and a request that would pass it is turned away with a 503 (retry)
rather than let many large uploads exhaust memory. Every problem with the form itself is an `UploadError` carrying
a 4xx status (503 for the budget) and a one-line message.
"""

from __future__ import annotations

from dataclasses import dataclass, field

try:
    from python_multipart.multipart import MultipartParser, parse_options_header
except ImportError:  # python-multipart before 0.0.13 names its module `multipart`
    from multipart.multipart import MultipartParser, parse_options_header

FIELD = "file"
#: Files one request may carry (the page sends one per request).
MAX_FILES = 16
#: Bytes of a non-file form field that are kept (its name is all that is used).
FIELD_BYTES = 1024
#: Room for boundaries and part headers in a request's size bound.
FRAMING_BYTES = 64 * 1024


class Budget:
    """Upload bytes the server may hold at once, across all requests (used from the event loop only)."""

    def __init__(self, limit: int):
        self.limit = limit
        self.held = 0

    def take(self, n: int) -> bool:
        if self.held + n > self.limit:
            return False
        self.held += n
        return True

    def give(self, n: int) -> None:
        self.held -= n


class UploadError(Exception):
    """A form the server cannot read: `status` (a 4xx) and a one-line message."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status = status


@dataclass
class Part:
    """One part of the form: its field `name`, the file name the client gave, and its bytes (None once it passed
    `max_bytes`; `size` still counts them all)."""

    name: str | None = None
    filename: str | None = None
    data: bytearray | None = field(default_factory=bytearray)
    size: int = 0


def _text(raw: bytes | None) -> str | None:
    """Header text as str: UTF-8 where it is, each other byte replaced (it is only shown back, never opened)."""
    return None if raw is None else raw.decode("utf-8", "replace")


class _Collector:
    """python-multipart callbacks that collect the parts of one form under the limits."""

    def __init__(self, max_bytes: int, max_files: int, budget: Budget):
        self.max_bytes = max_bytes
        self.max_files = max_files
        self.budget = budget
        self.held = 0  # bytes of this form taken from the budget
        self.parts: list[Part] = []
        self._header_name = bytearray()
        self._header_value = bytearray()
        self._headers: dict[bytes, bytes] = {}

    def on_part_begin(self) -> None:
        if len(self.parts) >= self.max_files:
            raise UploadError(413, f"too many parts: at most {self.max_files} files per request")
        self.parts.append(Part())
        self._headers = {}

    def on_header_field(self, data: bytes, start: int, end: int) -> None:
        self._header_name += data[start:end]

    def on_header_value(self, data: bytes, start: int, end: int) -> None:
        self._header_value += data[start:end]

    def on_header_end(self) -> None:
        self._headers[bytes(self._header_name).lower()] = bytes(self._header_value)
        self._header_name.clear()
        self._header_value.clear()

    def on_headers_finished(self) -> None:
        _, options = parse_options_header(self._headers.get(b"content-disposition", b""))
        part = self.parts[-1]
        part.name = _text(options.get(b"name"))
        part.filename = _text(options.get(b"filename"))

    def on_part_data(self, data: bytes, start: int, end: int) -> None:
        part = self.parts[-1]
        part.size += end - start
        limit = self.max_bytes if part.name == FIELD else FIELD_BYTES
        if part.data is not None:
            if part.size > limit:
                self.release(len(part.data))
                part.data = None  # over the bound: counted from here on, never kept
            elif self.budget.take(end - start):
                self.held += end - start
                part.data += data[start:end]
            else:
                raise UploadError(503, f"the server holds {self.budget.held:,} bytes of uploads already (at most "
                                       f"{self.budget.limit:,}); retry shortly")

    def release(self, n: int | None = None) -> None:
        """Give `n` bytes (default: all this form holds) back to the budget."""
        n = self.held if n is None else n
        self.budget.give(n)
        self.held -= n

    def callbacks(self) -> dict:
        return {"on_part_begin": self.on_part_begin, "on_header_field": self.on_header_field,
                "on_header_value": self.on_header_value, "on_header_end": self.on_header_end,
                "on_headers_finished": self.on_headers_finished, "on_part_data": self.on_part_data}


def request_bound(max_bytes: int, max_files: int = MAX_FILES) -> int:
    """The most bytes one request body may have."""
    return max_files * max_bytes + FRAMING_BYTES


def default_budget(max_bytes: int) -> Budget:
    """What all requests may hold at once: 1 GiB, or two full requests where those are larger."""
    return Budget(max(1 << 30, 2 * request_bound(max_bytes)))


async def read_files(request, max_bytes: int, budget: Budget, max_files: int = MAX_FILES) -> tuple[list[Part], int]:
    """The parts of a `multipart/form-data` request sent under the field name `file` (at least one) and the bytes
    they hold of `budget` (the caller gives them back once done with the parts); or an `UploadError`: not a
    multipart form, a body over `request_bound`, a malformed form, an empty form, a form with no `file` field (the
    message names the fields it had), or a full budget."""
    content_type, options = parse_options_header(request.headers.get("content-type", ""))
    if content_type != b"multipart/form-data":
        got = _text(content_type) or "none"
        raise UploadError(415, f"send the images as multipart/form-data under the field name '{FIELD}' (content "
                               f"type was {got})")
    boundary = options.get(b"boundary")
    if not boundary:
        raise UploadError(400, "the multipart/form-data content type has no boundary")
    bound = request_bound(max_bytes, max_files)
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > bound:
        raise UploadError(413, f"request too large: {int(declared):,} bytes exceeds {bound:,} (at most {max_files} "
                               f"files of --max-bytes {max_bytes:,})")
    collector = _Collector(max_bytes, max_files, budget)
    try:
        await _parse(request, boundary, collector, bound, max_bytes, max_files)
        files = [part for part in collector.parts if part.name == FIELD]
        if not collector.parts:
            raise UploadError(400, f"empty form: no file uploaded; send each image under the field name '{FIELD}'")
        if not files:
            names = ", ".join(sorted({repr(p.name) for p in collector.parts}))
            raise UploadError(400, f"no field named '{FIELD}' in the form (it had {names}); send each image under "
                                   f"the field name '{FIELD}'")
    except BaseException:
        collector.release()
        raise
    return files, collector.held


async def _parse(request, boundary: bytes, collector: _Collector, bound: int, max_bytes: int, max_files: int) -> None:
    """Stream the body through the parser into `collector`, within `bound` bytes."""
    parser = MultipartParser(boundary, collector.callbacks())
    received = 0
    try:
        async for chunk in request.stream():
            received += len(chunk)
            if received > bound:
                raise UploadError(413, f"request too large: more than {bound:,} bytes (at most {max_files} files of "
                                       f"--max-bytes {max_bytes:,})")
            parser.write(chunk)
        parser.finalize()
    except UploadError:
        raise
    except Exception as exc:  # noqa: BLE001 - python-multipart's parse errors differ between versions
        message = " ".join(str(exc).split()) or type(exc).__name__
        raise UploadError(400, f"malformed multipart/form-data body: {message}") from None
