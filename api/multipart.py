"""A ``multipart/form-data`` upload read as it arrives, for ``POST /v1/files``.

Why not FastAPI's ``UploadFile``: it reads the whole body before the route runs — before the
caller is even authenticated — and spools it to a temporary file, which is then read a second
time to store it. Here the route authenticates first, then pulls the body from the server a
piece at a time (``pull``), and the file part's bytes go straight to storage through ``read``;
memory holds about one chunk whatever the file's size, and nothing touches the local disk.
Parsing is python-multipart's streaming parser, the one Starlette uses.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Callable

from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header

from shared.errors import BadRequest, InvalidField, PayloadTooLarge

MAX_FIELD_BYTES = 64 * 1024


class MultipartUpload:
    """One form's fields, and the bytes of its part named ``file`` through ``read``."""

    def __init__(self, content_type: str | None, pull: Callable[[], bytes | None], file_field: str = "file"):
        kind, options = parse_options_header(content_type or "")
        boundary = options.get(b"boundary")
        if kind != b"multipart/form-data" or not boundary:
            raise BadRequest("the body must be multipart/form-data with a 'file' part")
        self._pull = pull
        self._file_field = file_field
        self.fields: dict[str, str] = {}
        self.filename: str | None = None
        self._pending: deque[bytes] = deque()
        self._pending_size = 0
        self._headers: dict[bytes, bytes] = {}
        self._header_field = b""
        self._header_value = b""
        self._part: str | None = None  # "file", a field name, or None before headers end
        self._field_value = bytearray()
        self._file_seen = self._file_done = self._body_done = False
        self._parser = MultipartParser(
            boundary,
            {
                "on_part_begin": self._on_part_begin,
                "on_header_field": self._on_header_field,
                "on_header_value": self._on_header_value,
                "on_header_end": self._on_header_end,
                "on_headers_finished": self._on_headers_finished,
                "on_part_data": self._on_part_data,
                "on_part_end": self._on_part_end,
            },
        )

    # ------------------------------------------------------------ the parser's callbacks

    def _on_part_begin(self) -> None:
        self._headers = {}
        self._part = None
        self._field_value = bytearray()

    def _on_header_field(self, data: bytes, start: int, end: int) -> None:
        self._header_field += data[start:end]

    def _on_header_value(self, data: bytes, start: int, end: int) -> None:
        self._header_value += data[start:end]

    def _on_header_end(self) -> None:
        self._headers[self._header_field.lower()] = self._header_value
        self._header_field = self._header_value = b""

    def _on_headers_finished(self) -> None:
        _, options = parse_options_header(self._headers.get(b"content-disposition", b""))
        name = options.get(b"name", b"").decode("utf-8", "replace")
        filename = options.get(b"filename")
        if name == self._file_field and filename is not None:
            if self._file_seen:
                raise InvalidField("send one file per upload", param="file")
            self._file_seen = True
            self.filename = filename.decode("utf-8", "replace").rsplit("/", 1)[-1] or "upload.jsonl"
            self._part = "file"
        else:
            self._part = "field:" + name

    def _on_part_data(self, data: bytes, start: int, end: int) -> None:
        if self._part == "file":
            piece = data[start:end]
            self._pending.append(piece)
            self._pending_size += len(piece)
        else:
            self._field_value += data[start:end]
            if len(self._field_value) > MAX_FIELD_BYTES:
                raise PayloadTooLarge(f"a form field holds at most {MAX_FIELD_BYTES} bytes")

    def _on_part_end(self) -> None:
        if self._part == "file":
            self._file_done = True
        elif self._part is not None:
            self.fields[self._part.removeprefix("field:")] = self._field_value.decode("utf-8", "replace")

    # ------------------------------------------------------------ reading

    def _feed(self) -> bool:
        """Parse the next piece of the body; False once it has all been read."""
        if self._body_done:
            return False
        piece = self._pull()
        try:
            if not piece:
                self._body_done = True
                self._parser.finalize()
                return False
            self._parser.write(piece)
        except MultipartParseError as exc:
            # A body that is not the multipart its header announces is the client's mistake.
            raise BadRequest(f"the multipart body is malformed: {exc}") from exc
        return True

    def read(self, size: int) -> bytes:
        """Up to ``size`` bytes of the file; ``b""`` once it has all been read."""
        while self._pending_size < size and not self._file_done and self._feed():
            pass
        if not self._file_seen:
            raise InvalidField("a 'file' part is required", param="file")
        out = bytearray()
        while self._pending and len(out) < size:
            piece = self._pending.popleft()
            room = size - len(out)
            if len(piece) > room:
                self._pending.appendleft(piece[room:])
                piece = piece[:room]
            out += piece
        self._pending_size -= len(out)
        if not out and not self._file_done:
            raise BadRequest("the body ended inside the file part")
        return bytes(out)

    def finish(self) -> dict[str, str]:
        """Read the rest of the body (fields after the file) and return every field."""
        while self._feed():
            pass
        return self.fields
