"""Feed parsing against realistic documents in ``tests/fixtures/feeds/``.

Dates are checked as exact Unix seconds (the ISO form is in the comment next to each), links as
absolute URLs, text as the exact clean string a reader (or a model) would be given.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import pytest

from shared.knowledge.parse import (
    MAX_CONTENT_CHARS,
    MAX_ENTRIES,
    ParsedArticle,
    ParseError,
    html_to_text,
    parse_feed,
)

FEEDS = Path(__file__).parent.parent / "fixtures" / "feeds"
BASE = "https://feeds.example.com/path/feed.xml"


def fixture(name: str) -> bytes:
    return (FEEDS / name).read_bytes()


def sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def test_rss20_with_cdata_entities_and_content_encoded() -> None:
    feed = parse_feed(fixture("rss20_content_encoded.xml"), base_url=BASE, content_type="application/rss+xml")
    assert feed.title == "Tom & Jerry’s Engineering Blog"
    first, second = feed.articles

    assert first.guid == "tag:blog.example.com,2025:post-1042"
    assert first.title == "Queues & back-pressure: what we’ve learned"
    assert (
        first.link == "https://blog.example.com/2025/06/queues-back-pressure?utm_source=rss&utm_medium=feed"
    )
    assert first.published_at == 1748936361  # 2025-06-03T09:39:21+02:00
    # content:encoded wins over the teaser in <description>; script and style are gone with their text.
    assert first.content == (
        "Why queues?\n"
        "\n"
        "Producers and consumers rarely run at the same speed & that’s fine.\n"
        "\n"
        "Bound every queue\n"
        "Shed load early\n"
        "\n"
        "Read our post on retries.\n"
        "Thanks for reading!"
    )
    assert first.content_hash == sha256(first.content)

    assert second.guid == "https://blog.example.com/2025/05/rock-and-roll"  # isPermaLink guid
    assert second.title == "Rock & Roll reliability"  # CDATA title with markup
    assert (
        second.link == "https://feeds.example.com/2025/05/rock-and-roll"
    )  # relative <link>, against the feed URL
    assert second.published_at == 1748733300  # 2025-05-31T23:15:00Z
    assert second.content == "Escaped HTML:\n\nCafé menus & tips\n\nSecond paragraph."


def test_no_text_keeps_tags_or_undecoded_entities() -> None:
    for name in ("rss20_content_encoded.xml", "atom10_xml_base.xml", "rss10_rdf.xml", "iso8859_1.xml"):
        for article in parse_feed(fixture(name), base_url=BASE).articles:
            for text in (article.title, article.content):
                assert "<p" not in text and "</" not in text and "<![CDATA[" not in text
                assert (
                    "&amp;" not in text and "&#" not in text and "&nbsp;" not in text and "\xa0" not in text
                )
                assert "trackPageView" not in text and "color: red" not in text


def test_rss10_rdf_uses_dc_date() -> None:
    feed = parse_feed(fixture("rss10_rdf.xml"), base_url="https://news.example.org/rss")
    assert feed.title == "Example Science News"
    assert feed.articles == [
        ParsedArticle(
            guid="https://news.example.org/articles/comet",
            title="Comet visible at dawn",
            link="https://news.example.org/articles/comet",
            published_at=1736926200,  # 2025-01-15T08:30:00+01:00
            content="Look east about an hour before sunrise.",
            content_hash=sha256("Look east about an hour before sunrise."),
        ),
        ParsedArticle(
            guid="https://news.example.org/articles/fusion",
            title="Fusion record broken",  # escaped <em> markup stripped
            link="https://news.example.org/articles/fusion",
            published_at=1736892310,  # 2025-01-14T22:05:10Z
            content="The reactor held the plasma for 22 minutes.",
            content_hash=sha256("The reactor held the plasma for 22 minutes."),
        ),
    ]


def test_atom10_resolves_links_against_xml_base() -> None:
    # The document's xml:base outranks the URL it was fetched from.
    feed = parse_feed(fixture("atom10_xml_base.xml"), base_url=BASE, content_type="application/atom+xml")
    assert feed.title == "Example Atom Blog"  # type="html" title
    relative, xhtml, plain = feed.articles

    assert relative.guid == "urn:uuid:1225c695-cfb8-4ebb-aaaa-80da344efa6a"
    assert relative.title == "Relative links & xml:base"
    assert (
        relative.link == "https://example.org/blog/posts/relative-links"
    )  # the alternate link, not rel=edit
    assert relative.published_at == 1740837600  # <published> 2025-03-01T09:00:00-05:00 over <updated>
    assert (
        relative.content == "Links in Atom resolve against xml:base.\n\nSecond paragraph."
    )  # <content> over <summary>

    assert xhtml.guid == "tag:example.org,2025:xhtml"
    assert xhtml.title == "An XHTML title"
    assert xhtml.link == "https://example.org/archive/2025/xhtml-content.html"  # the entry's own xml:base
    assert xhtml.published_at == 1740768330  # only <updated>: 2025-02-28T18:45:30Z
    assert (
        xhtml.content == "First paragraph with an inline link.\n\ndef f(x):\n    return x + 1"
    )  # <pre> kept

    assert plain.title == "Plain text title with <angle brackets>"  # type="text": not markup
    assert plain.link == "https://elsewhere.example.net/absolute"
    assert plain.published_at == 1740614400  # 2025-02-27T00:00:00Z
    assert plain.content == "Plain text content\nwith two lines & an ampersand."


@pytest.mark.parametrize(
    "content_type",
    [
        None,
        "application/rss+xml",
        "text/xml",
        "application/rss+xml; charset=ISO-8859-1",
        "text/html; charset=utf-8",
    ],
)
def test_iso_8859_1_declared_in_the_prolog(content_type: str | None) -> None:
    body = fixture("iso8859_1.xml")
    assert "Grüße".encode("iso-8859-1") in body and "Grüße".encode() not in body
    feed = parse_feed(body, base_url="https://muller.example.de/feed", content_type=content_type)
    assert feed.title == "Café Müller Nachrichten"
    [article] = feed.articles
    assert article.title == "Grüße aus München"
    assert article.content == "Das Café öffnet um 7 Uhr – überall Kaffee."
    assert article.published_at == 1739340000  # 2025-02-12T07:00:00+01:00
    assert article.link == article.guid == "https://muller.example.de/artikel/gruesse"


def test_windows_1252_curly_quotes_and_euro_sign() -> None:
    feed = parse_feed(fixture("windows1252.xml"), base_url="https://quotes.example.com/rss")
    assert feed.title == "Smart “Quotes” Weekly"
    [article] = feed.articles
    assert article.title == "It’s a “dash” – and a euro € sign"
    assert article.content == "Naïve résumé … done."


def test_utf8_without_declaration_or_charset_is_utf8() -> None:
    body = (
        '<rss version="2.0"><channel><title>Ünïcode</title><item><title>Ça va</title></item></channel></rss>'
    )
    feed = parse_feed(body.encode(), base_url=BASE, content_type="text/xml")
    assert (feed.title, feed.articles[0].title) == ("Ünïcode", "Ça va")


def test_items_without_guid_fall_back_to_link_then_to_a_hash() -> None:
    feed = parse_feed(fixture("rss_no_guids.xml"), base_url="https://cdn.example.net/shop/rss.xml")
    absolute, relative, bare = feed.articles

    assert absolute.guid == absolute.link == "https://shop.example.com/news/absolute"
    assert absolute.published_at == 1736164800  # 2025-01-06T12:00:00Z

    assert relative.guid == relative.link == "https://cdn.example.net/shop/news/relative?id=7"
    assert relative.published_at is None

    assert bare.link is None
    assert bare.title == "No link, no guid"
    assert bare.content == "Only a title and a description identify this one."
    assert bare.guid == "sha256:" + sha256(f"{bare.title}\n{bare.content}")
    # Stable: the same item gets the same guid on the next import.
    again = parse_feed(fixture("rss_no_guids.xml"), base_url="https://cdn.example.net/shop/rss.xml")
    assert again.articles[2].guid == bare.guid


def test_rss091_and_atom03() -> None:
    rss = parse_feed(fixture("rss091.xml"), base_url="http://classic.example.com/rss.xml")
    assert rss.title == "Classic Headlines"
    [old] = rss.articles
    assert (old.guid, old.title, old.link, old.published_at, old.content) == (
        "http://classic.example.com/1999/hello.html",
        "Hello from 1999",
        "http://classic.example.com/1999/hello.html",
        None,
        "The first item.",
    )

    atom = parse_feed(fixture("atom03.xml"), base_url="http://legacy.example.com/atom.xml")
    assert atom.title == "Legacy Atom"
    [entry] = atom.articles
    assert entry.guid == "tag:legacy.example.com,2004:3.2397"
    assert entry.link == "http://legacy.example.com/2004/12/13/atom03"
    assert entry.published_at == 1102940969  # <issued> 2004-12-13T08:29:29-04:00
    assert entry.content == "Escaped HTML content."


def test_malformed_xml_without_entries_is_a_parse_error() -> None:
    with pytest.raises(ParseError, match=r"^malformed feed: .*not well-formed"):
        parse_feed(fixture("malformed.xml"), base_url=BASE)


def test_malformed_xml_whose_entries_were_recovered_is_accepted() -> None:
    # A bare "&" and an HTML &nbsp; make it invalid XML; feedparser's lenient parser still reads it.
    feed = parse_feed(fixture("recoverable.xml"), base_url=BASE)
    assert feed.title == "Fish & Chips Daily"
    [article] = feed.articles
    assert article.title == "Cod & haddock prices"
    assert article.content == "Prices rose 5% & queues grew."
    assert article.published_at == 1736532000  # 2025-01-10T18:00:00Z


@pytest.mark.parametrize(
    ("body", "message"),
    [
        (b"", "empty document"),
        (b"  \n\t ", "empty document"),
        (
            b"<html><head><title>Sign in</title></head><body><p>Please sign in</p></body></html>",
            "not an RSS or Atom feed",
        ),
        (b'{"items": []}', "not an RSS or Atom feed"),
        (b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR", "not an RSS or Atom feed"),
    ],
)
def test_documents_that_are_not_feeds(body: bytes, message: str) -> None:
    with pytest.raises(ParseError) as caught:
        parse_feed(body, base_url=BASE)
    assert str(caught.value).startswith(message)
    assert len(str(caught.value)) <= 200


def test_a_body_naming_a_local_file_is_not_read_from_disk() -> None:
    # feedparser opens a bytes argument that names a file; the body must only ever be data.
    path = str(FEEDS / "rss20_content_encoded.xml").encode()
    with pytest.raises(ParseError, match=r"^not an RSS or Atom feed"):
        parse_feed(path, base_url=BASE)


def test_a_well_formed_feed_with_no_items_is_empty_not_an_error() -> None:
    body = b'<?xml version="1.0"?><rss version="2.0"><channel><title>Quiet</title></channel></rss>'
    feed = parse_feed(body, base_url=BASE)
    assert (feed.title, feed.articles) == ("Quiet", [])


def item(i: int, *, guid: str | None = None, link: str = "", description: str = "Body") -> str:
    guid_xml = f"<guid>{guid}</guid>" if guid is not None else ""
    return (
        f"<item><title>Item {i}</title>{guid_xml}<link>{link}</link>"
        f"<description>{description}</description></item>"
    )


def rss(*items: str) -> bytes:
    channel = f"<channel><title>T</title>{''.join(items)}</channel>"
    return f'<?xml version="1.0"?><rss version="2.0">{channel}</rss>'.encode()


def test_entries_are_capped() -> None:
    feed = parse_feed(rss(*(item(i, guid=f"id-{i}") for i in range(MAX_ENTRIES + 200))), base_url=BASE)
    assert len(feed.articles) == MAX_ENTRIES
    assert (feed.articles[0].guid, feed.articles[-1].guid) == ("id-0", f"id-{MAX_ENTRIES - 1}")


def test_content_is_capped_and_hashed_as_stored() -> None:
    feed = parse_feed(rss(item(1, guid="big", description="word " * 100_000)), base_url=BASE)
    [article] = feed.articles
    assert len(article.content) <= MAX_CONTENT_CHARS
    assert article.content.startswith("word word")
    assert article.content_hash == sha256(article.content)


def test_a_repeated_guid_keeps_the_first_copy() -> None:
    feed = parse_feed(rss(item(1, guid="same"), item(2, guid="same"), item(3, guid="other")), base_url=BASE)
    assert [(a.guid, a.title) for a in feed.articles] == [("same", "Item 1"), ("other", "Item 3")]


def test_links_that_are_not_http_are_dropped() -> None:
    feed = parse_feed(
        rss(item(1, link="javascript:alert(1)"), item(2, link="mailto:a@example.com")), base_url=BASE
    )
    assert [a.link for a in feed.articles] == [None, None]
    assert all(a.guid.startswith("sha256:") for a in feed.articles)


def test_empty_items_are_skipped() -> None:
    feed = parse_feed(rss("<item></item>", "<item><title> </title></item>", item(1, guid="x")), base_url=BASE)
    assert [a.guid for a in feed.articles] == ["x"]


def test_content_hash_ignores_markup_and_whitespace_but_not_words() -> None:
    def content_hash(description: str) -> str:
        return (
            parse_feed(rss(item(1, guid="g", description=description)), base_url=BASE)
            .articles[0]
            .content_hash
        )

    original = content_hash("&lt;p&gt;Prices rose  today.&lt;/p&gt;")
    assert content_hash("&lt;p&gt;&lt;span&gt;Prices rose today.&lt;/span&gt;&lt;/p&gt;\n") == original
    assert content_hash("&lt;p&gt;Prices fell today.&lt;/p&gt;") != original


def test_unparsable_dates_are_none() -> None:
    body = rss(item(1, guid="g").replace("</item>", "<pubDate>sometime last week</pubDate></item>"))
    assert parse_feed(body, base_url=BASE).articles[0].published_at is None


@pytest.mark.parametrize(
    ("html", "text"),
    [
        ("<p>Hello <b> world</b>!</p><p>Next</p>", "Hello world!\n\nNext"),
        ("line one<br>line two<br/><br><br><br>line three", "line one\nline two\n\nline three"),
        ("<h2>Title</h2>Body text", "Title\n\nBody text"),
        (
            "<p>Intro</p><ul><li>one<ul><li>nested</li></ul></li><li>two</li></ul><p>End</p>",
            "Intro\n\none\nnested\ntwo\n\nEnd",
        ),
        ("<table><tr><th>A</th><th>B</th></tr><tr><td>1</td><td>2</td></tr></table>", "A B\n1 2"),
        ("Tom &amp; Jerry&#8217;s &nbsp;caf&eacute; &lt;tag&gt; &#x2014;", "Tom & Jerry’s café <tag> —"),
        ("<script>document.write('<p>x</p>')</script><style>p{}</style>kept", "kept"),
        ("<noscript>Enable JavaScript</noscript><svg><text>icon</text></svg>visible", "visible"),
        ("<head><title>Page</title></head><body><p>Body</p></body>", "Body"),
        ("<![CDATA[<p>wrapped &amp; unwrapped</p>]]>", "wrapped & unwrapped"),
        ("<div><!-- a comment -->text</div>", "text"),
        ("<pre>def f():\n    return 1</pre><p>after</p>", "def f():\n    return 1\n\nafter"),
        ("a < b and c > d", "a < b and c > d"),
        ("  lots\n\n of \t whitespace  ", "lots of whitespace"),
        ("nul\x00 and bell\x07 removed", "nul and bell removed"),
        ("<p>unclosed <b>bold <i>and italic", "unclosed bold and italic"),
        ("", ""),
    ],
)
def test_html_to_text(html: str, text: str) -> None:
    assert html_to_text(html) == text


def test_a_relative_guid_is_kept_as_written_so_a_moved_feed_keeps_its_keys() -> None:
    body = rss(item(1, guid="12345"), item(2, guid="/posts/9"))
    for base in ("http://old.example.com/rss", "https://new.example.com/feeds/main.xml"):
        assert [a.guid for a in parse_feed(body, base_url=base).articles] == ["12345", "/posts/9"]
    # Links still resolve against where the feed was fetched from.
    moved = parse_feed(
        rss(item(1, guid="g", link="posts/1")), base_url="https://new.example.com/feeds/main.xml"
    )
    assert moved.articles[0].link == "https://new.example.com/feeds/posts/1"


def test_a_relative_xml_base_resolves_against_the_fetch_url() -> None:
    body = b"""<?xml version="1.0"?>
<feed xmlns="http://www.w3.org/2005/Atom" xml:base="/blog/">
  <title>Relative base</title>
  <entry><id>urn:x:1</id><title>One</title><link href="2025/one.html"/></entry>
  <entry><id>urn:x:2</id><title>Two</title><link href="../top.html"/></entry>
</feed>"""
    feed = parse_feed(body, base_url="https://host.example/feeds/atom.xml")
    assert [a.link for a in feed.articles] == [
        "https://host.example/blog/2025/one.html",
        "https://host.example/top.html",
    ]
