"""The council: pure logic for answering one query with several models (SPEC §5.1).

``stages`` runs the three stages over an injected ``complete``; ``ranking`` parses and combines
reviews; ``prompts`` holds the text sent to models. The runner wires this to the providers.
"""

from workers.council.prompts import Message
from workers.council.ranking import InvalidRanking, RankEntry, aggregate_ranking, parse_final_ranking
from workers.council.stages import (
    CallRequest,
    CompleteFn,
    Completion,
    CouncilResult,
    CouncilSpec,
    KnowledgeSnippet,
    MemberResult,
    QueryInput,
    ReviewResult,
    SynthesisAttempt,
    run_council,
)

__all__ = [
    "CallRequest",
    "CompleteFn",
    "Completion",
    "CouncilResult",
    "CouncilSpec",
    "InvalidRanking",
    "KnowledgeSnippet",
    "MemberResult",
    "Message",
    "QueryInput",
    "RankEntry",
    "ReviewResult",
    "SynthesisAttempt",
    "aggregate_ranking",
    "parse_final_ranking",
    "run_council",
]
