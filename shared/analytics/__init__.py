"""Council analytics (SPEC §13): rollups folded from finished queries (``rollups``), the
statistics (``fitting``), the leaderboard and batch reports read from the rollups (``reports``),
and user feedback (``feedback``)."""
