"""OpenAI batch input lines (SPEC §11): parse and validate each line into a query's request doc.

Pure: no I/O. A line is ``{custom_id, method: "POST", url: "/v1/chat/completions", body: {model,
messages, max_tokens?, temperature?, …}}``; ``body.model`` picks the line's work — ``"council"``
(the configured council), ``"council:<name>"`` (a ``[councils.<name>]`` preset) or one model
(stage 1 only). Every problem of every line is reported, with its line number (from 1), the field
and why, in OpenAI's ``errors.data`` shape, because a client fixing a 50,000-line file needs the
whole list, not one error per round trip. Parameters we do not use (``top_p``, ``n``…) are ignored,
as a drop-in must accept what OpenAI accepts.

Anthropic's Message Batches requests go through the same checks (``anthropic_line``), so both
shapes accept exactly the same work.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import orjson

from shared.providers.config import Catalog

CHAT_URL = "/v1/chat/completions"
CUSTOM_ID_MAX = 64
COUNCIL = "council"
ROLES = {"system": "system", "developer": "system", "user": "user", "assistant": "assistant"}
# A file full of bad lines gets this many entries; a last one says how many more there were.
MAX_ERRORS = 1000


# What each ``body.model`` of a file resolved to (``resolve_work``), so each is resolved once.
Works = dict[str, dict[str, Any] | str]


@dataclass(frozen=True)
class LineRules:
    max_prompt_chars: int = 200_000
    max_tokens: int = 1_000_000


@dataclass(frozen=True)
class ParsedLine:
    line: int
    custom_id: str
    # The query's request doc: messages, max_tokens, temperature, the model as asked ("model") and
    # the work it resolved to ("council": mode, members, chairman), which the worker runs.
    request: dict[str, Any]


def line_error(line: int | None, code: str, param: str | None, message: str) -> dict[str, Any]:
    return {"code": code, "line": line, "message": message, "param": param}


def resolve_work(model: Any, catalog: Catalog) -> dict[str, Any] | str:
    """The council a ``body.model`` asks for, or why it names none."""
    if not isinstance(model, str) or not model:
        return "must be a non-empty string"
    if model == COUNCIL:
        return {"mode": "council", "members": list(catalog.members), "chairman": catalog.chairman}
    prefix, sep, name = model.partition(":")
    if prefix == COUNCIL and sep:
        preset = catalog.councils.get(name)
        if preset is None:
            known = ", ".join(sorted(catalog.councils)) or "none configured"
            return f"names no council preset {name!r} (presets: {known})"
        return {"mode": preset.mode, "members": list(preset.members), "chairman": preset.chairman}
    model_id = catalog.resolve_model(model)
    if model_id is None:
        return (
            f"{model!r} is unknown: not 'council', 'council:<preset>', a 'provider:model' id of a "
            "configured provider, nor a model name the configuration names exactly once"
        )
    return {"mode": "single", "members": [model_id], "chairman": model_id}


def is_text(value: Any) -> bool:
    """A string that can be stored and sent: a JSON body parsed by the standard library may hold
    lone surrogates, which no database driver or provider accepts."""
    if not isinstance(value, str):
        return False
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def _text(content: Any) -> str | None:
    """A message's text: a string, or OpenAI/Anthropic content parts of type text."""
    if isinstance(content, str):
        return content
    if isinstance(content, list) and content:
        texts = []
        for part in content:
            if (
                not isinstance(part, dict)
                or part.get("type") != "text"
                or not isinstance(part.get("text"), str)
            ):
                return None
            texts.append(part["text"])
        return "\n".join(texts)
    return None


def check_messages(messages: Any, param: str) -> tuple[list[dict[str, str]], list[tuple[str, str]]]:
    """Normalised messages, and (param, why) for each problem."""
    if not isinstance(messages, list) or not messages:
        return [], [(param, "must be a non-empty array of messages")]
    out: list[dict[str, str]] = []
    problems: list[tuple[str, str]] = []
    has_user = False
    # Once per message of every line of a 50,000-line file: the param path is only built for a
    # problem, and the 'user' check rides along.
    for i, message in enumerate(messages):
        if not isinstance(message, dict):
            problems.append((f"{param}[{i}]", "must be an object with 'role' and 'content'"))
            continue
        given = message.get("role")
        role = ROLES.get(given) if isinstance(given, str) else None
        if role is None:
            problems.append((f"{param}[{i}].role", f"must be one of {', '.join(ROLES)}, got {given!r}"))
            continue
        content = message.get("content")
        text = content if isinstance(content, str) else _text(content)
        if text is None or not text.strip():
            problems.append((f"{param}[{i}].content", "must be non-empty text (a string or text parts)"))
            continue
        has_user = has_user or role == "user"
        out.append({"role": role, "content": text})
    if not problems and not has_user:
        problems.append((param, "needs at least one 'user' message"))
    return out, problems


def check_params(
    body: dict[str, Any], param: str, rules: LineRules
) -> tuple[dict[str, Any], list[tuple[str, str]]]:
    """``max_tokens`` (or ``max_completion_tokens``) and ``temperature``."""
    problems: list[tuple[str, str]] = []
    params: dict[str, Any] = {"max_tokens": None, "temperature": None}
    for key in ("max_tokens", "max_completion_tokens"):
        value = body.get(key)
        if value is None:
            continue
        if not isinstance(value, int) or isinstance(value, bool) or not 1 <= value <= rules.max_tokens:
            problems.append((f"{param}.{key}", f"must be an integer from 1 to {rules.max_tokens}"))
        else:
            params["max_tokens"] = value
    temperature = body.get("temperature")
    if temperature is not None:
        if (
            not isinstance(temperature, int | float)
            or isinstance(temperature, bool)
            or not 0 <= temperature <= 2
        ):
            problems.append((f"{param}.temperature", "must be a number from 0 to 2"))
        else:
            params["temperature"] = float(temperature)
    return params, problems


def parse_line(
    number: int, raw: bytes, catalog: Catalog, rules: LineRules, works: Works | None = None
) -> tuple[ParsedLine | None, list[dict[str, Any]]]:
    """One input line: the parsed line, or None and every problem found in it."""
    try:
        doc = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        return None, [line_error(number, "invalid_json", None, f"line {number} is not valid JSON: {exc}")]
    if not isinstance(doc, dict):
        return None, [line_error(number, "invalid_request", None, f"line {number} must be a JSON object")]
    problems: list[tuple[str, str, str]] = []  # (code, param, why)
    custom_id = doc.get("custom_id")
    if not isinstance(custom_id, str) or not custom_id:
        problems.append(("missing_required_parameter", "custom_id", "must be a non-empty string"))
    elif len(custom_id) > CUSTOM_ID_MAX:
        problems.append(("invalid_value", "custom_id", f"must be at most {CUSTOM_ID_MAX} characters"))
    if doc.get("method") != "POST":
        problems.append(("invalid_value", "method", f"must be 'POST', got {doc.get('method')!r}"))
    if doc.get("url") != CHAT_URL:
        problems.append(("invalid_url", "url", f"must be {CHAT_URL!r}, got {doc.get('url')!r}"))
    body = doc.get("body")
    request: dict[str, Any] = {}
    if not isinstance(body, dict):
        problems.append(("missing_required_parameter", "body", "must be an object"))
    else:
        request, body_problems = check_body(body, "body", catalog, rules, works=works)
        problems.extend(body_problems)
    if problems:
        return None, [
            line_error(number, code, param, f"line {number}: {param} {why}") for code, param, why in problems
        ]
    assert isinstance(custom_id, str)
    return ParsedLine(number, custom_id, request), []


def check_body(
    body: dict[str, Any],
    param: str,
    catalog: Catalog,
    rules: LineRules,
    *,
    system: Any = None,
    works: Works | None = None,
) -> tuple[dict[str, Any], list[tuple[str, str, str]]]:
    """A chat body (or an Anthropic ``params``) as a request doc, and (code, param, why) problems."""
    problems: list[tuple[str, str, str]] = []
    model = body.get("model")
    if works is not None and isinstance(model, str):
        # A file names a few models 50,000 times: each is resolved once (a shared, read-only doc).
        work = works.get(model) or works.setdefault(model, resolve_work(model, catalog))
    else:
        work = resolve_work(model, catalog)
    if isinstance(work, str):
        code = "missing_required_parameter" if model is None else "model_not_found"
        problems.append((code, f"{param}.model", work))
    messages, message_problems = check_messages(body.get("messages"), f"{param}.messages")
    if message_problems:
        problems.extend(("invalid_value", p, why) for p, why in message_problems)
    if system is not None:
        text = _text(system)
        if text is None:
            problems.append(("invalid_value", f"{param}.system", "must be text (a string or text parts)"))
        elif text.strip():
            messages = [{"role": "system", "content": text}, *messages]
    params, param_problems = check_params(body, param, rules)
    if param_problems:
        problems.extend(("invalid_value", p, why) for p, why in param_problems)
    size = sum(len(m["content"]) for m in messages)
    if size > rules.max_prompt_chars:
        problems.append(
            (
                "invalid_value",
                f"{param}.messages",
                f"hold {size} characters; the limit is {rules.max_prompt_chars}",
            )
        )
    if problems:
        return {}, problems
    assert isinstance(work, dict) and isinstance(model, str)
    return {"messages": messages, **params, "model": model, "council": work}, []


@dataclass
class FileReport:
    """What validating a whole file found."""

    requests: int = 0
    errors: list[dict[str, Any]] = field(default_factory=list)
    more_errors: int = 0

    def add(self, errors: list[dict[str, Any]]) -> None:
        if not errors:
            return
        room = MAX_ERRORS - len(self.errors)
        self.errors.extend(errors[: max(0, room)])
        self.more_errors += max(0, len(errors) - max(0, room))

    def errors_object(self) -> dict[str, Any]:
        data = list(self.errors)
        if self.more_errors:
            data.append(
                line_error(None, "too_many_errors", None, f"and {self.more_errors} more problems not listed")
            )
        return {"object": "list", "data": data}


class InvalidFile(Exception):
    """Raised by ``FileCheck.rows`` once the whole file is read, when any line was invalid; the
    caller's transaction rolls back whatever rows were stored."""

    def __init__(self, report: FileReport):
        super().__init__(f"{len(report.errors)} problems")
        self.report = report


class FileCheck:
    """Checks a file's lines one pass: ``rows`` yields each valid request while the file is valid
    so far, and keeps reading (and reporting) after the first problem without yielding more."""

    def __init__(self, catalog: Catalog, rules: LineRules):
        self.catalog, self.rules = catalog, rules
        self.report = FileReport()
        self._seen: dict[str, int] = {}
        self._works: Works = {}

    def check(self, number: int, raw: bytes) -> ParsedLine | None:
        self.report.requests += 1
        parsed, errors = parse_line(number, raw, self.catalog, self.rules, self._works)
        if parsed is not None:
            first = self._seen.setdefault(parsed.custom_id, number)
            if first != number:
                errors = [
                    line_error(
                        number,
                        "duplicate_custom_id",
                        "custom_id",
                        f"line {number}: custom_id {parsed.custom_id!r} is used by line {first} too",
                    )
                ]
                parsed = None
        else:
            # A bad line's custom_id still counts, so a later line reusing it is reported too.
            custom_id = _custom_id_of(raw)
            if custom_id is not None:
                self._seen.setdefault(custom_id, number)
        self.report.add(errors)
        return parsed

    def rows(self, lines: Iterable[bytes]) -> Iterator[ParsedLine]:
        """Empty lines are skipped; numbers count every line."""
        for number, raw in enumerate(lines, start=1):
            if not raw.strip():
                continue
            parsed = self.check(number, raw)
            if parsed is not None and not self.report.errors:
                yield parsed
        if self.report.requests == 0:
            self.report.add([line_error(None, "empty_file", None, "the file holds no requests")])
        if self.report.errors:
            raise InvalidFile(self.report)


def too_many(requests: int, max_requests: int) -> dict[str, Any]:
    return line_error(
        None,
        "too_many_requests",
        None,
        f"the file holds {requests} requests; a batch holds at most {max_requests}",
    )


def validate_file(
    lines: Iterable[bytes], catalog: Catalog, rules: LineRules, *, max_requests: int
) -> FileReport:
    """Every problem in the file (empty lines are skipped; numbers count every line)."""
    check = FileCheck(catalog, rules)
    with contextlib.suppress(InvalidFile):
        for _ in check.rows(lines):
            pass
    if check.report.requests > max_requests:
        check.report.add([too_many(check.report.requests, max_requests)])
    return check.report


def _custom_id_of(raw: bytes) -> str | None:
    try:
        doc = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None
    custom_id = doc.get("custom_id") if isinstance(doc, dict) else None
    return custom_id if isinstance(custom_id, str) else None
