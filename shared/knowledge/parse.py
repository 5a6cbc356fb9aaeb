"""Parsing a feed (SPEC §8): the bytes of an RSS or Atom document → ``ParsedFeed`` of clean articles.

Owns what an article *is* for the knowledge base: its guid (the entry's id, else its absolute link,
else a hash of title and content), a clean-text title, an absolute http(s) link, a publication time
in Unix seconds, content reduced from HTML to readable text (``html_to_text``), and the hash that
tells a changed article from an unchanged one. feedparser does the formats (RSS 0.9x/1.0/2.0,
Atom 0.3/1.0), the character encodings, ``xml:base`` and the recovery from malformed XML.

It does no I/O and keeps no state: fetching is ``fetch.py``; de-duplication and versions are
``store.py``. Parsing is CPU work (about a second for a few megabytes of HTML-heavy feed); callers
on an event loop should run it in a thread.

``ParseError`` is raised when a document yields no entries and is not a recognisable, well-formed
(if empty) feed. Malformed XML from which feedparser recovered entries is accepted: feeds are
often slightly broken (a bare ``&``, an HTML entity XML does not know), and the articles are
still worth having.
"""

from __future__ import annotations

import calendar
import hashlib
import io
import re
import unicodedata
from dataclasses import dataclass
from html.parser import HTMLParser
from typing import Any
from urllib.parse import urljoin, urlsplit

import feedparser
from feedparser.exceptions import ThingsNobodyCaresAboutButMe

MAX_ENTRIES = 1_000
MAX_CONTENT_CHARS = 200_000
MAX_TITLE_CHARS = 1_000
MAX_GUID_CHARS = 1_000
MAX_LINK_CHARS = 2_048
# HTML is trimmed before conversion: html.parser's cost grows with its input, and five times the
# text limit leaves room for markup while bounding the work one article can ask for.
_MAX_HTML_CHARS = 5 * MAX_CONTENT_CHARS
_MAX_ERROR_CHARS = 200

_HTML_TYPES = frozenset({"text/html", "application/xhtml+xml", "html", "xhtml"})
_CHARSET = re.compile(r"""charset\s*=\s*["']?([A-Za-z0-9._:-]+)""", re.IGNORECASE)
_HORIZONTAL_SPACE = re.compile(r"[^\S\n]+")
_BLANK_LINES = re.compile(r"\n{3,}")
_CDATA = re.compile(r"<!\[CDATA\[(.*?)\]\]>", re.DOTALL)
# C0 controls other than tab and newline, and DEL: never readable, and PostgreSQL text refuses NUL.
_CONTROL = re.compile(r"[\x00-\x08\x0b-\x1f\x7f]")


@dataclass(frozen=True)
class ParsedArticle:
    guid: str  # entry id/guid; else the (absolute) link; else "sha256:" + a hash of title and content
    title: str  # clean text on one line
    link: str | None  # absolute http(s)
    published_at: int | None  # Unix seconds (UTC), from published, else updated
    content: str  # clean text: paragraphs separated by a blank line
    content_hash: str  # sha256 hex of ``content``, which is already normalised


@dataclass(frozen=True)
class ParsedFeed:
    title: str
    articles: list[ParsedArticle]  # document order (usually newest first), unique guids


class ParseError(Exception):
    """The document is not a feed, or too malformed to yield any entry; the message says which."""


def parse_feed(body: bytes, *, base_url: str, content_type: str | None = None) -> ParsedFeed:
    """Parse a fetched feed; relative links resolve against ``base_url`` (the final URL) or ``xml:base``.

    ``content_type`` is the response's ``Content-Type``; only its charset is used. At most
    ``MAX_ENTRIES`` articles are returned; entries with no title, link or content are skipped.
    """
    if not body.strip():
        raise ParseError("empty document")
    result = feedparser.parse(
        # A stream, never bytes: feedparser treats bytes that name a file as a path and reads it.
        io.BytesIO(body),
        # No Content-Location: feedparser would resolve a relative RSS <guid> against it (isPermaLink
        # defaults to true), and a feed that moved (http to https, a new path) would re-key every
        # article. Links are resolved against base_url below, after any xml:base has been applied.
        response_headers={"content-type": _xml_media_type(content_type)},
        # Markup is only ever reduced to text (html_to_text drops scripts and styles itself), so the
        # links inside it are never used and nothing is rendered that would need sanitising;
        # feedparser's sanitiser would also cost about ten times the rest of its parse.
        resolve_relative_uris=False,
        sanitize_html=False,
    )
    articles: dict[str, ParsedArticle] = {}
    for entry in result.get("entries") or []:
        article = _article(entry, base_url)
        # A guid repeated within one document is the same article; the first (newest) copy wins.
        if article is not None and article.guid not in articles:
            articles[article.guid] = article
            if len(articles) == MAX_ENTRIES:
                break
    if not articles:
        # Decided on articles, not entries: the loose parser turns the debris of a broken
        # document into empty entries.
        _require_empty_feed(result)
    feed_title = _text_field(result.get("feed") or {}, "title")[:MAX_TITLE_CHARS]
    return ParsedFeed(title=feed_title, articles=list(articles.values()))


def html_to_text(html: str) -> str:
    """Readable plain text from an HTML fragment or document.

    Block elements become line breaks (paragraphs, headings, lists and tables a blank line), table
    cells are separated by spaces, ``<pre>`` keeps its lines, scripts, styles and other non-text
    elements are dropped with their contents, entities are decoded, CDATA sections are unwrapped
    and whitespace is collapsed.
    """
    extractor = _TextExtractor()
    # Unwrapped, not passed through: feeds double-wrap HTML in CDATA, and html.parser would
    # otherwise drop the section (before Python 3.13) or keep its markup as text.
    extractor.feed(_CDATA.sub(r"\1", _CONTROL.sub("", html[:_MAX_HTML_CHARS])))
    extractor.close()
    return _tidy(extractor.text(), keep_indent=True)


def _xml_media_type(content_type: str | None) -> str:
    # feedparser follows RFC 3023, which makes text/xml (and any text/*) without a charset US-ASCII
    # and ignores the XML declaration; RFC 7303 replaced that: the declaration (or UTF-8) decides,
    # unless the server names a charset. Presenting every response as application/xml gets that.
    match = _CHARSET.search(content_type or "")
    return f"application/xml; charset={match.group(1)}" if match else "application/xml"


def _require_empty_feed(result: dict[str, Any]) -> None:
    version = result.get("version") or ""
    problem = result.get("bozo_exception") if result.get("bozo") else None
    # Encoding and media-type complaints do not mean the XML was broken.
    if isinstance(problem, ThingsNobodyCaresAboutButMe):
        problem = None
    if not version:
        detail = f" ({problem})" if problem is not None else ""
        raise ParseError(f"not an RSS or Atom feed{detail}"[:_MAX_ERROR_CHARS])
    if problem is not None:
        raise ParseError(f"malformed feed: {problem}"[:_MAX_ERROR_CHARS])


def _article(entry: dict[str, Any], base_url: str) -> ParsedArticle | None:
    title = _text_field(entry, "title")[:MAX_TITLE_CHARS]
    link = _absolute_link(dict.get(entry, "link"), base_url)
    content = _content(entry)
    if not (title or link or content):
        return None
    content_hash = hashlib.sha256(content.encode("utf-8")).hexdigest()
    return ParsedArticle(
        guid=_guid(entry, link, title, content),
        title=title,
        link=link,
        published_at=_published_at(entry),
        content=content,
        content_hash=content_hash,
    )


def _guid(entry: dict[str, Any], link: str | None, title: str, content: str) -> str:
    raw = dict.get(entry, "id")
    guid = raw.strip() if isinstance(raw, str) else ""
    if guid:
        # Still unique and stable, but short enough for an index.
        if len(guid) > MAX_GUID_CHARS:
            return "sha256:" + hashlib.sha256(guid.encode("utf-8")).hexdigest()
        return guid
    if link:
        return link
    return "sha256:" + hashlib.sha256(f"{title}\n{content}".encode()).hexdigest()


def _absolute_link(value: object, base_url: str) -> str | None:
    if not isinstance(value, str) or not value.strip():
        return None
    try:
        link = urljoin(base_url, value.strip())
        parts = urlsplit(link)
    except ValueError:
        return None
    # javascript:, data:, mailto: and friends are not articles a reader can open.
    if parts.scheme not in ("http", "https") or not parts.netloc or len(link) > MAX_LINK_CHARS:
        return None
    return link


def _published_at(entry: dict[str, Any]) -> int | None:
    # dict.get, not entry.get: feedparser's own lookup of updated_parsed falls back to
    # published_parsed with a DeprecationWarning.
    for key in ("published_parsed", "updated_parsed"):
        value = dict.get(entry, key)
        if value:
            try:
                return calendar.timegm(value)
            except (TypeError, ValueError, OverflowError):
                continue
    return None


def _content(entry: dict[str, Any]) -> str:
    # content:encoded and Atom <content> (full text) before description and <summary> (often a teaser).
    candidates = [
        *(dict.get(entry, "content") or []),
        dict.get(entry, "summary_detail") or {"value": dict.get(entry, "summary"), "type": "text/html"},
    ]
    for detail in candidates:
        text = _clean(detail.get("value"), detail.get("type"), multiline=True)
        if text:
            return text[:MAX_CONTENT_CHARS].rstrip()
    return ""


def _text_field(container: dict[str, Any], key: str) -> str:
    detail = dict.get(container, f"{key}_detail") or {}
    return _clean(dict.get(container, key), detail.get("type"), multiline=False)


def _clean(value: object, media_type: object, *, multiline: bool) -> str:
    if not isinstance(value, str) or not value:
        return ""
    # feedparser types RSS fields that look like HTML (a close tag, an entity) as text/html itself.
    text = html_to_text(value) if str(media_type or "text/html").lower() in _HTML_TYPES else _tidy(value)
    return text if multiline else " ".join(text.split())


def _tidy(text: str, *, keep_indent: bool = False) -> str:
    """Normalised text: NFC, no control characters, no trailing spaces, at most one blank line in a row.

    ``keep_indent`` keeps leading and repeated spaces (``html_to_text`` has already collapsed all but
    those of ``<pre>``); otherwise each line's whitespace is collapsed.
    """
    text = unicodedata.normalize("NFC", _CONTROL.sub("", text.replace("\r\n", "\n").replace("\r", "\n")))
    if keep_indent:
        lines = [line.rstrip() for line in text.split("\n")]
    else:
        lines = [_HORIZONTAL_SPACE.sub(" ", line).strip() for line in text.split("\n")]
    return _BLANK_LINES.sub("\n\n", "\n".join(lines)).strip("\n")


# Elements whose contents are not article text.
_SKIPPED = frozenset(
    {"script", "style", "noscript", "template", "head", "title", "svg", "math", "iframe", "object", "canvas"}
    | {"video", "audio", "select"}
)
_LINE_BREAK = frozenset(
    {"br", "li", "dt", "dd", "tr", "div", "caption", "figcaption", "address", "summary", "form"}
)
_PARAGRAPH_BREAK = frozenset(
    {"p", "h1", "h2", "h3", "h4", "h5", "h6", "blockquote", "pre", "dl", "table", "hr"}
    | {"figure", "section", "article", "header", "footer", "aside", "main", "nav", "details", "fieldset"}
)
_LISTS = frozenset({"ul", "ol"})
_CELLS = frozenset({"td", "th"})
_WHITESPACE = re.compile(r"\s+")


class _TextExtractor(HTMLParser):
    """Collects text with line-break markers; ``_tidy`` then trims and collapses."""

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self._parts: list[str] = []
        self._skipping: list[str] = []  # open skipped elements, innermost last
        self._pre = 0
        self._lists = 0
        self._breaks = 0  # newlines owed before the next text

    def text(self) -> str:
        return "".join(self._parts)

    def handle_starttag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        if tag == "body":
            # A <head> left open must not swallow the document.
            self._skipping = [t for t in self._skipping if t != "head"]
        if tag in _SKIPPED:
            self._skipping.append(tag)
            return
        self._block(tag)
        if tag == "pre":
            self._pre += 1
        elif tag in _LISTS:
            self._lists += 1

    def handle_startendtag(self, tag: str, attrs: list[tuple[str, str | None]]) -> None:
        # <br/>, <hr/>; a self-closed <script/> has no contents to skip.
        if tag not in _SKIPPED:
            self._block(tag)

    def handle_endtag(self, tag: str) -> None:
        if tag in _SKIPPED:
            if tag in self._skipping:
                # Close it and anything left open inside it.
                del self._skipping[len(self._skipping) - 1 - self._skipping[::-1].index(tag) :]
            return
        if tag == "pre" and self._pre:
            self._pre -= 1
        elif tag in _LISTS and self._lists:
            self._lists -= 1
        if tag != "br":
            self._block(tag)

    def handle_data(self, data: str) -> None:
        if self._skipping:
            return
        text = data if self._pre else _WHITESPACE.sub(" ", data)
        at_line_start = self._breaks > 0 or not self._parts or self._parts[-1].endswith("\n")
        if not self._pre and (at_line_start or self._parts[-1].endswith(" ")):
            text = text.lstrip(" ")
        if not text:
            return
        if self._breaks and self._parts:
            self._parts.append("\n" * self._breaks)
        self._breaks = 0
        self._parts.append(text)

    def _block(self, tag: str) -> None:
        if tag in _PARAGRAPH_BREAK or (tag in _LISTS and not self._lists):
            self._breaks = max(self._breaks, 2)
        elif tag in _LISTS:  # a list nested in an item continues its parent's lines
            self._breaks = max(self._breaks, 1)
        elif tag in _LINE_BREAK:
            self._breaks = max(self._breaks, 1) if tag != "br" else self._breaks + 1
        elif tag in _CELLS and self._parts and not self._parts[-1].endswith((" ", "\n")) and not self._breaks:
            self._parts.append(" ")
