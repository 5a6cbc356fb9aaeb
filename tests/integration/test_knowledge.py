"""The knowledge base end to end: feeds served over real HTTP, imported by the feed job into the
real database, searched through the API, and used to ground a council batch on real workers."""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi.testclient import TestClient

from api.main import create_app
from shared.knowledge.feeds import import_due_feeds
from shared.settings import Settings
from shared.sim import SimServer
from tests.conftest import new_key
from tests.helpers import jsonl, sim_log, wait_for_batch
from tests.receivers import LoopbackServer, QuietHandler

pytestmark = pytest.mark.integration

FIXTURES = Path(__file__).parent.parent / "fixtures" / "feeds"


def rss(items: list[tuple[str, str, str]]) -> bytes:
    entries = "".join(
        f"<item><title>{t}</title><link>https://news.example.org/{g}</link><guid>{g}</guid>"
        "<pubDate>Mon, 03 Nov 2025 10:00:00 GMT</pubDate>"
        f"<description><![CDATA[<p>{body}</p>]]></description></item>"
        for g, t, body in items
    )
    return (
        '<?xml version="1.0" encoding="UTF-8"?><rss version="2.0"><channel><title>Example news</title>'
        f"<link>https://news.example.org/</link><description>d</description>{entries}</channel></rss>"
    ).encode()


class FeedServer(LoopbackServer):
    """Serves feeds by path, with ETag/Last-Modified and 304s; some paths misbehave on purpose."""

    def __init__(self) -> None:
        self.feeds: dict[str, bytes] = {}
        self.seen: list[dict[str, str]] = []
        server = self

        class Handler(QuietHandler):
            def do_GET(self) -> None:
                server.seen.append({"path": self.path, **{k.lower(): v for k, v in self.headers.items()}})
                if self.path == "/huge.xml":
                    self.send_response(200)
                    self.send_header("content-type", "application/rss+xml")
                    self.end_headers()
                    chunk = b"<!-- " + b"x" * 65_536 + b" -->"
                    try:
                        for _ in range(800):  # about 50 MB, unless the client hangs up first
                            self.wfile.write(chunk)
                    except OSError:
                        pass
                    return
                if self.path == "/endless.xml":
                    self.send_response(200)
                    self.send_header("content-type", "application/rss+xml")
                    self.end_headers()
                    try:
                        self.wfile.write(b'<?xml version="1.0"?><rss version="2.0"><channel>')
                        for _ in range(120):
                            self.wfile.write(b" ")
                            self.wfile.flush()
                            time.sleep(0.5)  # the server side of the test: a publisher that never finishes
                    except OSError:
                        pass
                    return
                body = server.feeds.get(self.path)
                if body is None:
                    self.send_response(404)
                    self.end_headers()
                    return
                etag = f'"{hash(body) & 0xFFFFFFFF:x}"'
                if self.headers.get("If-None-Match") == etag:
                    self.send_response(304)
                    self.send_header("ETag", etag)
                    self.end_headers()
                    return
                self.send_response(200)
                self.send_header("content-type", "application/rss+xml")
                self.send_header("ETag", etag)
                self.send_header("Last-Modified", "Mon, 03 Nov 2025 10:00:00 GMT")
                self.send_header("content-length", str(len(body)))
                self.end_headers()
                self.wfile.write(body)

        super().__init__(Handler)


@pytest.fixture
def feeds() -> Iterator[FeedServer]:
    with FeedServer() as server:
        yield server


@pytest.fixture(scope="module")
def kb_settings(settings: Settings) -> Settings:
    return settings.model_copy(update={"webhook_allow_private": True})


@pytest.fixture
def api(kb_settings: Settings, sessions: Any) -> Iterator[TestClient]:
    key, _ = new_key(sessions)
    with TestClient(create_app(kb_settings), headers={"Authorization": f"Bearer {key}"}) as client:
        yield client


def run_feed_job(sessions: Any, timeout_s: float = 3.0) -> None:
    import_due_feeds(sessions, allow_private=True, timeout_s=timeout_s, max_bytes=1024 * 1024)


def add(api: TestClient, url: str, domain: str = "health") -> dict[str, Any]:
    response = api.post("/v1/knowledge/feeds", json={"url": url, "domain": domain, "interval_minutes": 60})
    assert response.status_code == 201, response.text
    return response.json()


HEALTH = [
    (
        "h1",
        "Ibuprofen and kidney function",
        "NSAIDs such as ibuprofen reduce renal blood flow; patients with kidney disease should avoid them.",
    ),
    (
        "h2",
        "Statins lower LDL cholesterol",
        "Statin therapy reduces LDL cholesterol and cardiovascular events in high-risk adults.",
    ),
    (
        "h3",
        "Measles vaccination schedule",
        "Two doses of the MMR vaccine give about 97 percent protection against measles.",
    ),
    (
        "h4",
        "Sleep and memory",
        "Deep sleep consolidates declarative memory; shift workers show measurable deficits.",
    ),
]


def test_import_search_versions_and_conditional_get(
    api: TestClient, sessions: Any, feeds: FeedServer
) -> None:
    feeds.feeds["/health.xml"] = rss(HEALTH)
    feeds.feeds["/atom.xml"] = (FIXTURES / "atom10_xml_base.xml").read_bytes()
    feeds.feeds["/latin1.xml"] = (FIXTURES / "iso8859_1.xml").read_bytes()
    health = add(api, f"{feeds.url}/health.xml")
    add(api, f"{feeds.url}/atom.xml", domain="tech")
    add(api, f"{feeds.url}/latin1.xml", domain="tech")
    run_feed_job(sessions)

    listed = {f["url"].rsplit("/", 1)[1]: f for f in api.get("/v1/knowledge/feeds").json()["data"]}
    assert all(f["last_error"] is None and f["last_success_at"] for f in listed.values()), listed
    articles = api.get("/v1/knowledge/articles", params={"domain": "health", "limit": 100}).json()["data"]
    assert {a["title"] for a in articles} == {t for _, t, _ in HEALTH}
    assert all(
        a["link"].startswith("https://news.example.org/") and a["published_at"] == 1762164000
        for a in articles
    )
    tech = api.get("/v1/knowledge/articles", params={"domain": "tech", "limit": 100}).json()["data"]
    assert tech and all(a["link"] and a["link"].startswith("http") for a in tech)

    # Ranked search: the relevant article first.
    for question, expected in [
        ("Can a patient with kidney disease take ibuprofen?", "Ibuprofen and kidney function"),
        ("How well does the MMR vaccine protect against measles?", "Measles vaccination schedule"),
        ("Do statins reduce cholesterol?", "Statins lower LDL cholesterol"),
        ("why does sleep matter for memory", "Sleep and memory"),
    ]:
        found = api.get("/v1/knowledge/articles", params={"q": question, "domain": "health"}).json()["data"]
        assert found and found[0]["title"] == expected, (question, [f["title"] for f in found])
    assert api.get("/v1/knowledge/articles", params={"q": "ibuprofen", "domain": "tech"}).json()["data"] == []

    # A second import of the unchanged feed is conditional, gets 304 and changes nothing.
    before = {a["id"]: a for a in articles}
    seen_before = len(feeds.seen)
    assert api.post(f"/v1/knowledge/feeds/{health['id']}/import").status_code == 202
    run_feed_job(sessions)
    conditional = [s for s in feeds.seen[seen_before:] if s["path"] == "/health.xml"]
    assert conditional and conditional[-1].get("if-none-match") and conditional[-1].get("if-modified-since")
    after = {
        a["id"]: a
        for a in api.get("/v1/knowledge/articles", params={"domain": "health", "limit": 100}).json()["data"]
    }
    assert after == before

    # A changed item becomes a new version of the same article, not a new article.
    changed = [
        (g, t, b + " Updated guidance: avoid in stage 3 disease.") if g == "h1" else (g, t, b)
        for g, t, b in HEALTH
    ]
    feeds.feeds["/health.xml"] = rss(changed)
    api.post(f"/v1/knowledge/feeds/{health['id']}/import")
    run_feed_job(sessions)
    after = api.get("/v1/knowledge/articles", params={"domain": "health", "limit": 100}).json()["data"]
    assert len(after) == len(HEALTH)
    h1 = next(a for a in after if a["title"] == "Ibuprofen and kidney function")
    detail = api.get(f"/v1/knowledge/articles/{h1['id']}").json()
    assert "Updated guidance" in detail["content"]
    assert [("Updated guidance" in v["content"]) for v in detail["versions"]] == [False, True]


def test_broken_feeds_are_recorded_and_never_block_the_others(
    api: TestClient, sessions: Any, feeds: FeedServer
) -> None:
    feeds.feeds["/good.xml"] = rss(HEALTH[:2])
    feeds.feeds["/malformed.xml"] = (FIXTURES / "malformed.xml").read_bytes()
    broken = {
        "malformed": add(api, f"{feeds.url}/malformed.xml"),
        "huge": add(api, f"{feeds.url}/huge.xml"),
        "endless": add(api, f"{feeds.url}/endless.xml"),
        "missing": add(api, f"{feeds.url}/missing.xml"),
    }
    good = add(api, f"{feeds.url}/good.xml")
    started = time.monotonic()
    run_feed_job(sessions, timeout_s=2.0)
    assert time.monotonic() - started < 30
    listed = {f["id"]: f for f in api.get("/v1/knowledge/feeds").json()["data"]}
    assert listed[good["id"]]["last_error"] is None and listed[good["id"]]["last_success_at"]
    errors = {name: listed[f["id"]]["last_error"] for name, f in broken.items()}
    assert all(errors.values()), errors
    assert "larger than" in errors["huge"]
    assert "timed out" in errors["endless"]
    assert "404" in errors["missing"]
    assert all(listed[f["id"]]["consecutive_failures"] == 1 for f in broken.values())


def test_feed_urls_are_guarded(settings: Settings, sessions: Any) -> None:
    key, _ = new_key(sessions)
    with TestClient(create_app(settings), headers={"Authorization": f"Bearer {key}"}) as strict:
        response = strict.post(
            "/v1/knowledge/feeds", json={"url": "http://127.0.0.1/feed.xml", "domain": "x"}
        )
        assert response.status_code == 422 and response.json()["error"]["param"] == "url"
        viewer_key, _ = new_key(sessions, role="viewer")
        as_viewer = strict.post(
            "/v1/knowledge/feeds",
            json={"url": "https://example.com/feed.xml", "domain": "x"},
            headers={"Authorization": f"Bearer {viewer_key}"},
        )
        assert as_viewer.status_code == 403


def test_grounded_batch_cites_articles_the_council_saw(
    client: httpx.Client,
    sim: SimServer,
    sessions: Any,
    feeds: FeedServer,
    tenant_key: tuple[str, str],
    kb_settings: Settings,
) -> None:
    feeds.feeds["/ground.xml"] = rss(HEALTH)
    with TestClient(create_app(kb_settings), headers={"Authorization": f"Bearer {tenant_key[0]}"}) as api:
        add(api, f"{feeds.url}/ground.xml", domain="clinic")
        run_feed_job(sessions)
    body = {
        "queries": [
            {"custom_id": "g-1", "prompt": "[tag:g-1] Is ibuprofen safe for someone with kidney disease?"}
        ],
        "knowledge": {"domain": "clinic", "top_k": 2},
    }
    batch_id = client.post("/v1/batches", json=body).json()["id"]
    assert wait_for_batch(client, batch_id, timeout=60)["status"] == "completed"
    [record] = jsonl(client.get(f"/v1/batches/{batch_id}/results"))
    assert 1 <= len(record["citations"]) <= 2
    first = client.get(f"/v1/knowledge/articles/{record['citations'][0]}")
    assert first.status_code == 200 and first.json()["title"] == "Ibuprofen and kidney function"
    stage1 = [
        r
        for r in sim_log(sim.url)
        if "[tag:g-1]" in r["text"] and r["kind"] == "answer" and r["model"] != "chairman"
    ]
    assert len(stage1) == 3
    assert all("renal blood flow" in r["text"] for r in stage1)


# Real-world-shaped fixtures served over HTTP and imported by the feed job (exact values as the
# parser's unit tests pin them; relative links resolve against where the feed was served).
Expected = dict[str, tuple[str | None, int | None, str]]
FIXTURE_FEEDS: dict[str, tuple[str, Callable[[str], Expected]]] = {
    "/blog/feed.xml": (
        "rss20_content_encoded.xml",
        lambda base: {
            "Queues & back-pressure: what we’ve learned": (
                "https://blog.example.com/2025/06/queues-back-pressure?utm_source=rss&utm_medium=feed",
                1748936361,
                "Why queues?\n\nProducers and consumers rarely run at the same speed & that’s fine.\n\n"
                "Bound every queue\nShed load early\n\nRead our post on retries.\nThanks for reading!",
            ),
            "Rock & Roll reliability": (
                f"{base}/2025/05/rock-and-roll",
                1748733300,
                "Escaped HTML:\n\nCafé menus & tips\n\nSecond paragraph.",
            ),
        },
    ),
    "/rss10.xml": (
        "rss10_rdf.xml",
        lambda base: {
            "Comet visible at dawn": (
                "https://news.example.org/articles/comet",
                1736926200,
                "Look east about an hour before sunrise.",
            ),
            "Fusion record broken": (
                "https://news.example.org/articles/fusion",
                1736892310,
                "The reactor held the plasma for 22 minutes.",
            ),
        },
    ),
    "/atom.xml": (
        "atom10_xml_base.xml",
        lambda base: {
            "Relative links & xml:base": (
                "https://example.org/blog/posts/relative-links",
                1740837600,
                "Links in Atom resolve against xml:base.\n\nSecond paragraph.",
            ),
            "An XHTML title": (
                "https://example.org/archive/2025/xhtml-content.html",
                1740768330,
                "First paragraph with an inline link.\n\ndef f(x):\n    return x + 1",
            ),
            "Plain text title with <angle brackets>": (
                "https://elsewhere.example.net/absolute",
                1740614400,
                "Plain text content\nwith two lines & an ampersand.",
            ),
        },
    ),
    "/latin1.xml": (
        "iso8859_1.xml",
        lambda base: {
            "Grüße aus München": (
                "https://muller.example.de/artikel/gruesse",
                1739340000,
                "Das Café öffnet um 7 Uhr – überall Kaffee.",
            ),
        },
    ),
    "/shop/rss.xml": (
        "rss_no_guids.xml",
        lambda base: {
            "No link, no guid": (None, None, "Only a title and a description identify this one."),
        },
    ),
}


def test_real_world_feeds_import_exactly_over_http(api: TestClient, sessions: Any, feeds: FeedServer) -> None:
    domains = {path: f"fixture{i}" for i, path in enumerate(FIXTURE_FEEDS)}
    for path, (name, _) in FIXTURE_FEEDS.items():
        feeds.feeds[path] = (FIXTURES / name).read_bytes()
        add(api, f"{feeds.url}{path}", domain=domains[path])
    run_feed_job(sessions)
    listed = api.get("/v1/knowledge/feeds").json()["data"]
    assert all(f["last_error"] is None for f in listed), [f["last_error"] for f in listed]
    for path, (name, expected_for) in FIXTURE_FEEDS.items():
        expected = expected_for(feeds.url)
        domain = domains[path]
        articles = api.get("/v1/knowledge/articles", params={"domain": domain, "limit": 100}).json()["data"]
        by_title = {a["title"]: a for a in articles}
        for title, (link, published_at, content) in expected.items():
            assert title in by_title, (name, sorted(by_title))
            article = by_title[title]
            assert (article["link"], article["published_at"]) == (link, published_at), (name, title)
            assert api.get(f"/v1/knowledge/articles/{article['id']}").json()["content"] == content, (
                name,
                title,
            )
    shop = api.get(
        "/v1/knowledge/articles", params={"domain": domains["/shop/rss.xml"], "limit": 100}
    ).json()["data"]
    links = {a["link"] for a in shop}
    assert "https://shop.example.com/news/absolute" in links
    assert f"{feeds.url}/shop/news/relative?id=7" in links


def dated_rss(items: list[tuple[str, str, str | None]]) -> bytes:
    """RSS of ``(guid, title, pubDate or None)`` items, each about the same topic."""
    entries = "".join(
        f"<item><title>{t}</title><link>https://news.example.org/{g}</link><guid>{g}</guid>"
        + (f"<pubDate>{d}</pubDate>" if d else "")
        + f"<description>Comet {t} seen over the observatory; comet tails and orbits.</description></item>"
        for g, t, d in items
    )
    return (
        '<?xml version="1.0" encoding="UTF-8"?><rss version="2.0"><channel><title>Sky</title>'
        f"<link>https://news.example.org/</link><description>d</description>{entries}</channel></rss>"
    ).encode()


def pages(api: TestClient, params: dict[str, Any]) -> list[dict[str, Any]]:
    """Every page of a list, following ``after`` = ``last_id`` while ``has_more``."""
    seen: list[dict[str, Any]] = []
    after: str | None = None
    for _ in range(50):
        page = api.get("/v1/knowledge/articles", params={**params, **({"after": after} if after else {})})
        assert page.status_code == 200, page.text
        body = page.json()
        assert body["object"] == "list"
        data = body["data"]
        assert body["first_id"] == (data[0]["id"] if data else None)
        assert body["last_id"] == (data[-1]["id"] if data else None)
        seen.extend(data)
        if not body["has_more"]:
            return seen
        assert len(data) == params["limit"], "a page with more after it is full"
        after = body["last_id"]
    raise AssertionError("paging never ended")


def test_articles_page_with_a_cursor_listed_and_searched(
    api: TestClient, sessions: Any, feeds: FeedServer
) -> None:
    dates = [
        "Mon, 03 Nov 2025 10:00:00 GMT",
        "Tue, 04 Nov 2025 10:00:00 GMT",
        "Tue, 04 Nov 2025 10:00:00 GMT",  # the same date twice: the id breaks the tie
        None,  # no date: listed after every dated article
        "Sun, 02 Nov 2025 10:00:00 GMT",
        "Wed, 05 Nov 2025 10:00:00 GMT",
        None,
    ]
    domain = f"sky-{time.time_ns()}"
    feeds.feeds["/sky.xml"] = dated_rss([(f"s{i}", f"Sighting {i}", d) for i, d in enumerate(dates)])
    add(api, f"{feeds.url}/sky.xml", domain=domain)
    run_feed_job(sessions)

    everything = api.get("/v1/knowledge/articles", params={"domain": domain, "limit": 100}).json()
    assert len(everything["data"]) == 7 and everything["has_more"] is False
    published = [a["published_at"] for a in everything["data"]]
    dated = [p for p in published if p is not None]
    assert dated == sorted(dated, reverse=True) and published[-2:] == [None, None]

    paged = pages(api, {"domain": domain, "limit": 3})
    assert [a["id"] for a in paged] == [a["id"] for a in everything["data"]]

    ranked = api.get("/v1/knowledge/articles", params={"q": "comet", "domain": domain, "limit": 100}).json()
    assert len(ranked["data"]) == 7 and ranked["has_more"] is False
    paged_search = pages(api, {"q": "comet", "domain": domain, "limit": 2})
    assert [a["id"] for a in paged_search] == [a["id"] for a in ranked["data"]]

    # A cursor that names no article of this list ends it rather than starting it over.
    for params in ({"domain": domain}, {"q": "comet", "domain": domain}):
        stranger = api.get("/v1/knowledge/articles", params={**params, "limit": 3, "after": "art_nope"})
        assert stranger.status_code == 200 and stranger.json()["data"] == []
