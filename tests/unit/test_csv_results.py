"""CSV result lines are exactly what the csv module writes (dialect excel), quoting included."""

from __future__ import annotations

import csv
import io
import random
import string

from shared.batches.csv_results import csv_line


def test_lines_match_the_csv_module() -> None:
    rng = random.Random(3)
    alphabet = string.ascii_letters + " ,\"\r\n\t'=+-@;|\\é中"
    for _ in range(3000):
        cells: list[str | int | float] = []
        for _ in range(14):
            k = rng.random()
            if k < 0.2:
                cells.append(rng.randint(-(10**6), 10**6))
            elif k < 0.35:
                cells.append(rng.random() * 10 ** rng.randint(-9, 9))
            elif k < 0.45:
                cells.append("")
            else:
                cells.append("".join(rng.choice(alphabet) for _ in range(rng.randint(0, 30))))
        out = io.StringIO()
        csv.writer(out).writerow(cells)
        assert csv_line(cells) == out.getvalue(), cells
