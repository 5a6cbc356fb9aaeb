"""The knowledge base (SPEC §8): RSS/Atom feeds imported into searchable articles for grounding.

    fetch.py      one bounded, conditional HTTP GET of a feed → ``FetchResult`` (or ``FetchError``)
    parse.py      feed bytes → ``ParsedFeed`` of clean-text ``ParsedArticle``s (or ``ParseError``)
    store.py      feeds, articles and their versions: de-duplication by guid/link and content hash
    search.py     ranked full-text search over articles
    grounding.py  the top-k articles for a query, numbered as stage-1 context, and their citations

fetch and parse do no database work and keep no schedule: importing each feed on its interval and
recording ``last_error`` is the scheduler's feeds job (``scheduler/jobs/feeds.py``).
"""
