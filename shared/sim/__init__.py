"""The simulated LLM provider (SPEC §4.3): all three wire formats on one port, with configurable
latency, faults and messy rankings, for ``conclave demo``, the test suite and the benchmarks.

    answers.py   what it says (answers, stage 2 rankings, token estimates)
    faults.py    SimConfig and the per-request plan (latency, fault, ranking mess)
    wire.py      OpenAI / Anthropic / Gemini request parsing and real response/error shapes
    log.py       request log and counters behind /_sim/log and /_sim/stats
    app.py       the aiohttp routes
    server.py    SimServer (background thread) and serve (foreground, for the CLI)
"""

from shared.sim.app import create_app
from shared.sim.faults import ERROR_KINDS, SimConfig
from shared.sim.server import SimServer, serve

__all__ = ["ERROR_KINDS", "SimConfig", "SimServer", "create_app", "serve"]
