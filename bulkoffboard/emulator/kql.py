"""A small, honest subset of KQL for the emulator's advanced hunting endpoint.

``run_query`` runs a query over in-memory tables (lists of dicts) and returns ``(schema, rows)``
in the shape of ``POST /api/advancedqueries/run`` (mde-api.md section 5). A query is a table
name followed by ``| operator`` stages, over as many lines as you like, with ``//`` comments.

Operators:

* ``where <predicate>`` (``filter`` is a synonym);
* ``project A, B, New = <expression>``; ``project-away A, B``;
* ``distinct A, B`` or ``distinct *``;
* ``summarize [Name =] agg, ... [by A, B]`` with ``count()``, ``dcount(A)``, ``min(A)``,
  ``max(A)``, ``arg_max(A, *)``, ``arg_max(A, B, C)`` and ``arg_min`` alike; ``summarize by A``;
* ``take N`` / ``limit N``; ``top N by <expression> [asc|desc] [nulls first|last]``;
* ``order by`` / ``sort by`` ``<expression> [asc|desc] [nulls first|last], ...`` (descending by
  default, as in KQL); ``count``.

Expressions: columns; ``"double"``, ``'single'`` and ``@"verbatim"`` strings; integers and reals;
``true``/``false``; timespans (``7d``, ``12h``, ``30m``, ``10s``, ``100ms``, ...);
``datetime(2024-01-01)``, ``datetime(2024-01-01T10:00:00Z)``, ``datetime(null)``; ``now()``,
``ago(7d)``; ``+``/``-`` on numbers, datetimes and timespans; ``==``, ``!=``, ``<``, ``<=``,
``>``, ``>=``; ``=~``, ``!~`` (case-insensitive string equality); ``contains``, ``startswith``,
``endswith``, ``has`` (whole-term match) and their ``!`` negations and ``_cs`` (case-sensitive)
variants, case-insensitive otherwise; ``in (...)``, ``!in (...)``, ``in~ (...)``, ``!in~ (...)``
over constants; ``and``, ``or``, ``not(...)``, parentheses; ``isempty``, ``isnotempty``,
``isnull``, ``isnotnull``, ``tolower``, ``toupper``.

As in KQL, column, function and operator names are case-sensitive (``true``/``false`` are not);
``==`` on strings is case-sensitive; comparing values of different types (a string with a number,
a string with ``<``) is an error, not a silent false. A missing string value reads as ``""``;
any other comparison with a missing (``None``) value is false.

Column types come from the table rows: the union of their keys in first-seen order, each typed by
its first non-None value (``bool`` Boolean, ``int`` Int64, ``float`` Double, ``str`` String,
``datetime`` DateTime, ``timedelta`` TimeSpan, lists and dicts Dynamic; a column that is always
None is Dynamic). Pass ``schemas`` to state a table's columns explicitly. A table with no rows and
no stated schema cannot name its columns, so any column name is accepted there (as Dynamic).

Output: datetimes as ISO 8601 strings ending in ``Z``; timespans as ``[-][d.]hh:mm:ss[.fffffff]``.
Errors raise ``KqlError`` naming the token and its line and column.
"""

from __future__ import annotations

import copy
import json
import operator
import re
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta, timezone
from typing import Any, Final

__all__ = ["KqlError", "run_query"]

Row = Mapping[str, Any]
Stage = Callable[[list[Row]], list[Row]]
_Aggregate = Callable[[list[Row]], dict[str, Any]]
_Register = Callable[[dict[str, str]], _Aggregate]


class KqlError(ValueError):
    """A query outside the supported subset, or one that is wrong; names the token and place."""


# --------------------------------------------------------------------------------------------
# Types
# --------------------------------------------------------------------------------------------

STRING: Final = "String"
INT: Final = "Int64"
REAL: Final = "Double"
BOOL: Final = "Boolean"
DATETIME: Final = "DateTime"
TIMESPAN: Final = "TimeSpan"
DYNAMIC: Final = "Dynamic"
_NUMERIC: Final = frozenset({INT, REAL})
_KQL_TYPE_NAMES: Final = {
    STRING: "string",
    INT: "long",
    REAL: "real",
    BOOL: "bool",
    DATETIME: "datetime",
    TIMESPAN: "timespan",
    DYNAMIC: "dynamic",
}


def _type_of(value: Any) -> str | None:
    """The schema type of a Python value, or None for None."""
    if value is None:
        return None
    if isinstance(value, bool):
        return BOOL
    if isinstance(value, int):
        return INT
    if isinstance(value, float):
        return REAL
    if isinstance(value, str):
        return STRING
    if isinstance(value, datetime):
        return DATETIME
    if isinstance(value, timedelta):
        return TIMESPAN
    return DYNAMIC


def _infer_columns(rows: Sequence[Row]) -> dict[str, str]:
    """Column name to type, from the union of the rows' keys in first-seen order."""
    columns: dict[str, str | None] = {}
    for row in rows:
        for name, value in row.items():
            if columns.get(name) is None:
                columns[name] = _type_of(value)
    return {name: kind or DYNAMIC for name, kind in columns.items()}


def _same_family(left: str, right: str) -> bool:
    """Whether two types compare with each other (numbers together; Dynamic with anything)."""
    if DYNAMIC in (left, right):
        return True
    return left == right or (left in _NUMERIC and right in _NUMERIC)


# --------------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Token:
    """One lexical token: kind, source text, literal value (if any) and character offset."""

    kind: str  # "ident", "string", "number", "timespan", "datetime", "punct" or "end"
    text: str
    value: Any
    pos: int


_TIMESPAN_UNITS: Final = {
    **dict.fromkeys(["d", "day", "days"], timedelta(days=1)),
    **dict.fromkeys(["h", "hr", "hrs", "hour", "hours"], timedelta(hours=1)),
    **dict.fromkeys(["m", "min", "minute", "minutes"], timedelta(minutes=1)),
    **dict.fromkeys(["s", "sec", "second", "seconds"], timedelta(seconds=1)),
    **dict.fromkeys(
        ["ms", "milli", "millis", "millisecond", "milliseconds"], timedelta(milliseconds=1)
    ),
    **dict.fromkeys(["microsecond", "microseconds"], timedelta(microseconds=1)),
}
_NUMBER_RE: Final = re.compile(r"\d+(?:\.\d+)?(?:[eE][+-]?\d+)?")
_IDENT_RE: Final = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_OPERATOR_NAME_RE: Final = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(?:-[A-Za-z_][A-Za-z0-9_]*)*")
_UNIT_RE: Final = re.compile(r"[A-Za-z_]+")
_PUNCTUATION: Final = ("==", "!=", "=~", "!~", "<=", ">=", "<", ">", "=", "|", "(", ")", ",")
_PUNCTUATION_MORE: Final = ("*", "+", "-", ";", "[", "]", "{", "}", ".", ":")
_DATETIME_RE: Final = re.compile(
    r"(?P<date>\d{4}-\d{2}-\d{2})"
    r"(?:[Tt ](?P<hour>\d{2}):(?P<minute>\d{2})(?::(?P<second>\d{2})(?:\.(?P<fraction>\d+))?)?)?"
    r"(?P<offset>[Zz]|[+-]\d{2}:\d{2})?"
)


def _location(query: str, pos: int) -> str:
    """``line L, column C`` (both 1-based) for a character offset."""
    line = query.count("\n", 0, pos) + 1
    column = pos - (query.rfind("\n", 0, pos) + 1) + 1
    return f"line {line}, column {column}"


def _syntax_error(query: str, pos: int, detail: str) -> KqlError:
    return KqlError(f"Query could not be parsed: {detail} ({_location(query, pos)})")


def _parse_datetime_text(text: str) -> datetime | None:
    """An aware datetime from ``2024-01-01``, ``2024-01-01T10:00:00.1234567Z``, ``+02:00`` etc."""
    match = _DATETIME_RE.fullmatch(text)
    if match is None:
        return None
    try:
        day = datetime.strptime(match["date"], "%Y-%m-%d")
        value = day.replace(
            hour=int(match["hour"] or 0),
            minute=int(match["minute"] or 0),
            second=int(match["second"] or 0),
            microsecond=int((match["fraction"] or "").ljust(6, "0")[:6]),
        )
    except ValueError:
        return None
    offset = match["offset"]
    if offset is None or offset in "Zz":
        return value.replace(tzinfo=UTC)
    delta = timedelta(hours=int(offset[1:3]), minutes=int(offset[4:6]))
    return value.replace(tzinfo=timezone(-delta if offset[0] == "-" else delta))


class _Tokenizer:
    """Turns query text into tokens; one instance per query."""

    def __init__(self, query: str) -> None:
        self.query = query
        self.pos = 0
        self.tokens: list[_Token] = []

    def run(self) -> list[_Token]:
        """Tokenize the whole query, ending with an ``end`` token."""
        text = self.query
        while self.pos < len(text):
            char = text[self.pos]
            if char.isspace():
                self.pos += 1
            elif text.startswith("//", self.pos):
                newline = text.find("\n", self.pos)
                self.pos = len(text) if newline < 0 else newline
            elif char in "\"'":
                self._string(self.pos, verbatim=False)
            elif char == "@" and text[self.pos + 1 : self.pos + 2] in ("'", '"'):
                self._string(self.pos, verbatim=True)
            elif char.isdigit():
                self._number()
            elif char == "!" and text[self.pos + 1 : self.pos + 2].isalpha():
                self._word(prefix="!")
            elif char.isalpha() or char == "_":
                self._word(prefix="")
            else:
                self._punctuation()
        self.tokens.append(_Token("end", "", None, len(text)))
        return self.tokens

    def _add(self, kind: str, text: str, value: Any, pos: int) -> None:
        self.tokens.append(_Token(kind, text, value, pos))

    def _string(self, start: int, *, verbatim: bool) -> None:
        text = self.query
        pos = start + (2 if verbatim else 1)
        quote = text[pos - 1]
        chars: list[str] = []
        while pos < len(text) and text[pos] != "\n":
            char = text[pos]
            if char == quote:
                if verbatim and text[pos + 1 : pos + 2] == quote:
                    chars.append(quote)
                    pos += 2
                    continue
                self._add("string", text[start : pos + 1], "".join(chars), start)
                self.pos = pos + 1
                return
            if char == "\\" and not verbatim and pos + 1 < len(text):
                escaped = text[pos + 1]
                chars.append({"n": "\n", "t": "\t", "r": "\r"}.get(escaped, escaped))
                pos += 2
                continue
            chars.append(char)
            pos += 1
        raise _syntax_error(text, start, "unterminated string literal")

    def _number(self) -> None:
        text, start = self.query, self.pos
        match = _NUMBER_RE.match(text, start)
        assert match is not None  # noqa: S101 - the caller saw a digit
        raw = match.group()
        number: int | float = int(raw) if raw.isdigit() else float(raw)
        unit_match = _UNIT_RE.match(text, match.end())
        if unit_match is None:
            self._add("number", raw, number, start)
            self.pos = match.end()
            return
        unit = unit_match.group()
        if unit not in _TIMESPAN_UNITS:
            raise _syntax_error(
                text, start, f"invalid literal '{raw}{unit}' (not a number or a timespan)"
            )
        self._add("timespan", raw + unit, number * _TIMESPAN_UNITS[unit], start)
        self.pos = unit_match.end()

    def _word(self, prefix: str) -> None:
        text, start = self.query, self.pos
        previous = self.tokens[-1] if self.tokens else None
        after_pipe = previous is not None and previous.kind == "punct" and previous.text == "|"
        pattern = _OPERATOR_NAME_RE if after_pipe else _IDENT_RE
        match = pattern.match(text, start + len(prefix))
        assert match is not None  # noqa: S101 - the caller saw a letter
        word = prefix + match.group()
        end = match.end()
        if word in ("in", "!in") and text[end : end + 1] == "~":
            word += "~"
            end += 1
        if word == "datetime" and not prefix:
            opening = end
            while opening < len(text) and text[opening] in " \t":
                opening += 1
            if text[opening : opening + 1] == "(":
                self._datetime(start, opening)
                return
        self._add("ident", word, None, start)
        self.pos = end

    def _datetime(self, start: int, opening: int) -> None:
        text = self.query
        closing = text.find(")", opening)
        if closing < 0:
            raise _syntax_error(text, start, "datetime( is missing its ')'")
        raw = text[opening + 1 : closing].strip()
        value: datetime | None = None
        if raw != "null":
            value = _parse_datetime_text(raw)
            if value is None:
                raise _syntax_error(text, start, f"invalid datetime literal '{raw}'")
        self._add("datetime", text[start : closing + 1], value, start)
        self.pos = closing + 1

    def _punctuation(self) -> None:
        text, start = self.query, self.pos
        for symbol in (*_PUNCTUATION, *_PUNCTUATION_MORE):
            if text.startswith(symbol, start):
                self._add("punct", symbol, None, start)
                self.pos = start + len(symbol)
                return
        raise _syntax_error(text, start, f"unexpected character '{text[start]}'")


# --------------------------------------------------------------------------------------------
# Values
# --------------------------------------------------------------------------------------------


def _normalize(value: Any) -> Any:
    """Naive datetimes become UTC so that they compare with aware ones."""
    if isinstance(value, datetime) and value.tzinfo is None:
        return value.replace(tzinfo=UTC)
    return value


def _render_datetime(value: datetime) -> str:
    value = _normalize(value).astimezone(UTC)
    text = value.strftime("%Y-%m-%dT%H:%M:%S")
    if value.microsecond:
        text += f".{value.microsecond:06d}"
    return text + "Z"


def _render_timespan(value: timedelta) -> str:
    sign = "-" if value < timedelta(0) else ""
    value = abs(value)
    hours, rest = divmod(value.seconds, 3600)
    minutes, seconds = divmod(rest, 60)
    text = f"{value.days}." if value.days else ""
    text += f"{hours:02d}:{minutes:02d}:{seconds:02d}"
    if value.microseconds:
        text += f".{value.microseconds:06d}0"
    return sign + text


def _render(value: Any) -> Any:
    """A JSON-friendly copy of a value for the response."""
    if isinstance(value, datetime):
        return _render_datetime(value)
    if isinstance(value, timedelta):
        return _render_timespan(value)
    if isinstance(value, list | dict | tuple):
        return copy.deepcopy(value)
    return value


def _to_text(value: Any) -> str:
    """A value as the string operators see it (None is the empty string, as in KQL)."""
    if value is None:
        return ""
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, datetime | timedelta):
        return str(_render(value))
    if isinstance(value, list | dict | tuple):
        return json.dumps(value, default=str, separators=(",", ":"))
    return str(value)


def _hashable(value: Any) -> Any:
    """A hashable stand-in for grouping and de-duplication (lists and dicts via JSON)."""
    value = _normalize(value)
    if isinstance(value, list | dict | tuple):
        return ("dynamic", _to_text(value))
    return value


def _sort_key(value: Any) -> tuple[int, Any]:
    """An ordering key that never raises across mixed types."""
    value = _normalize(value)
    if isinstance(value, bool):
        return (0, value)
    if isinstance(value, int | float):
        return (1, value)
    if isinstance(value, str):
        return (2, value)
    if isinstance(value, datetime):
        return (3, value)
    if isinstance(value, timedelta):
        return (4, value)
    return (5, _to_text(value))


def _has_term(haystack: str, needle: str) -> bool:
    """KQL ``has``: the needle occurs bounded by non-alphanumerics where it is alphanumeric."""
    if not needle:
        return True
    start = haystack.find(needle)
    while start >= 0:
        end = start + len(needle)
        left_ok = start == 0 or not (needle[0].isalnum() and haystack[start - 1].isalnum())
        right_ok = end == len(haystack) or not (needle[-1].isalnum() and haystack[end].isalnum())
        if left_ok and right_ok:
            return True
        start = haystack.find(needle, start + 1)
    return False


_STRING_TESTS: Final[dict[str, Callable[[str, str], bool]]] = {
    "contains": lambda haystack, needle: needle in haystack,
    "startswith": str.startswith,
    "endswith": str.endswith,
    "has": _has_term,
}
_ORDERINGS: Final[dict[str, Callable[[Any, Any], bool]]] = {
    "<": operator.lt,
    "<=": operator.le,
    ">": operator.gt,
    ">=": operator.ge,
}
_EQUALITIES: Final = frozenset({"==", "!=", "=~", "!~"})
_IN_OPERATORS: Final = frozenset({"in", "!in", "in~", "!in~"})


def _string_operator(word: str) -> tuple[Callable[[str, str], bool], bool, bool] | None:
    """(test, case_sensitive, negated) for ``contains``, ``!has_cs`` and the like."""
    negated = word.startswith("!")
    base = word.removeprefix("!")
    case_sensitive = base.endswith("_cs")
    base = base.removesuffix("_cs")
    test = _STRING_TESTS.get(base)
    return None if test is None else (test, case_sensitive, negated)


def _equal(left: Any, right: Any, *, ignore_case: bool) -> bool | None:
    """KQL equality; None when a side is missing (so both == and != filter the row out)."""
    if left is None or right is None:
        return None
    left, right = _normalize(left), _normalize(right)
    if isinstance(left, str) and isinstance(right, str) and ignore_case:
        return left.casefold() == right.casefold()
    if isinstance(left, bool) != isinstance(right, bool):
        return False
    return bool(left == right)


# --------------------------------------------------------------------------------------------
# Expressions
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Expr:
    """A compiled scalar expression: its static type, how to compute it, and whether it is a
    constant (no column references), which ``in`` lists and ``take`` require."""

    type: str
    compute: Callable[[Row], Any]
    constant: bool = False


def _constant(value: Any, kind: str) -> _Expr:
    return _Expr(kind, lambda _row: value, constant=True)


@dataclass(slots=True)
class _Frame:
    """The columns flowing between stages. ``open`` marks a table whose columns are unknown
    (no rows and no stated schema): any column name resolves there, as Dynamic."""

    columns: dict[str, str]
    open: bool = False
    stages: list[Stage] = field(default_factory=list)


class _Parser:
    """Parses a query against the tables' columns into a list of stages."""

    def __init__(self, query: str, now: datetime) -> None:
        self.query = query
        self.tokens = _Tokenizer(query).run()
        self.index = 0
        self.now = _normalize(now)
        self.frame = _Frame({})

    # -- token helpers ---------------------------------------------------------------------

    @property
    def token(self) -> _Token:
        return self.tokens[self.index]

    def advance(self) -> _Token:
        token = self.tokens[self.index]
        if token.kind != "end":
            self.index += 1
        return token

    def at(self, text: str) -> bool:
        """Whether the current token is the punctuation or identifier ``text``."""
        return self.token.kind in ("punct", "ident") and self.token.text == text

    def fail(self, token: _Token, detail: str) -> KqlError:
        """A syntax error at ``token``."""
        return _syntax_error(self.query, token.pos, detail)

    def semantic(self, token: _Token, message: str) -> KqlError:
        """A semantic error (unknown column, type mismatch) at ``token``."""
        return KqlError(f"{message} ({_location(self.query, token.pos)})")

    def expect(self, text: str, context: str) -> _Token:
        if not self.at(text):
            raise self.fail(self.token, f"expected '{text}' {context}, found {_show(self.token)}")
        return self.advance()

    def expect_name(self, context: str) -> _Token:
        token = self.advance()
        if token.kind != "ident":
            raise self.fail(token, f"expected a column name {context}, found {_show(token)}")
        return token

    # -- query -----------------------------------------------------------------------------

    def table(
        self,
        tables: Mapping[str, Sequence[Row]],
        schemas: Mapping[str, Mapping[str, str]],
    ) -> Sequence[Row]:
        """query := table ('|' stage)* END; returns the source rows and fills ``self.frame``."""
        token = self.advance()
        if token.kind == "end":
            raise self.fail(token, "the query is empty")
        if token.kind != "ident":
            raise self.fail(token, f"expected a table name, found {_show(token)}")
        if token.text in ("let", "union", "print", "datatable", "range", "search", "find"):
            raise self.fail(token, f"unsupported statement '{token.text}'")
        if token.text not in tables:
            raise self.semantic(token, f"Failed to resolve table '{token.text}'")
        rows = tables[token.text]
        if token.text in schemas:
            self.frame = _Frame(dict(schemas[token.text]))
        else:
            self.frame = _Frame(_infer_columns(rows), open=not rows)
        while self.at("|"):
            self.advance()
            self.stage()
        if self.token.kind != "end":
            raise self.fail(self.token, f"unexpected {_show(self.token)}; expected '|'")
        return rows

    def stage(self) -> None:
        """One ``| operator ...`` stage."""
        token = self.advance()
        handlers: dict[str, Callable[[_Token], None]] = {
            "where": self.where,
            "filter": self.where,
            "project": self.project,
            "project-away": self.project_away,
            "distinct": self.distinct,
            "summarize": self.summarize,
            "take": self.take,
            "limit": self.take,
            "top": self.top,
            "order": self.order,
            "sort": self.order,
            "count": self.count,
        }
        if token.kind != "ident":
            raise self.fail(token, f"expected an operator after '|', found {_show(token)}")
        handler = handlers.get(token.text)
        if handler is None:
            raise self.fail(token, f"unsupported operator '{token.text}'")
        handler(token)

    def column(self, token: _Token) -> str:
        """The type of column ``token``, or a 'Failed to resolve' error."""
        kind = self.frame.columns.get(token.text)
        if kind is not None:
            return kind
        if self.frame.open:
            return DYNAMIC
        available = ", ".join(self.frame.columns) or "(none)"
        raise self.semantic(
            token, f"Failed to resolve column '{token.text}'; available: {available}"
        )

    # -- operators -------------------------------------------------------------------------

    def where(self, _op: _Token) -> None:
        start = self.token
        predicate = self.expression()
        if predicate.type not in (BOOL, DYNAMIC):
            raise self.semantic(
                start,
                f"where needs a bool predicate, got {_KQL_TYPE_NAMES[predicate.type]}",
            )
        test = predicate.compute
        self.frame.stages.append(lambda rows: [row for row in rows if test(row) is True])

    def project(self, op: _Token) -> None:
        outputs: dict[str, _Expr] = {}
        for name_token, expr in self.assignments(op, allow_expressions=True):
            if name_token.text in outputs:
                raise self.semantic(name_token, f"column '{name_token.text}' is projected twice")
            outputs[name_token.text] = expr
        self.frame.columns = {name: expr.type for name, expr in outputs.items()}
        self.frame.open = False
        computed = [(name, expr.compute) for name, expr in outputs.items()]
        self.frame.stages.append(
            lambda rows: [{name: fn(row) for name, fn in computed} for row in rows]
        )

    def assignments(self, op: _Token, *, allow_expressions: bool) -> list[tuple[_Token, _Expr]]:
        """``A, New = expression, ...`` for project (output name token, expression)."""
        items: list[tuple[_Token, _Expr]] = []
        while True:
            name = self.expect_name(f"in {op.text}")
            if self.at("=") and allow_expressions:
                self.advance()
                items.append((name, self.expression()))
            elif self.at("("):
                raise self.fail(name, f"{op.text} needs a name for an expression: Name = ...")
            else:
                items.append((name, _Expr(self.column(name), _getter(name.text))))
            if not self.at(","):
                return items
            self.advance()

    def column_list(self, op: _Token) -> list[str]:
        names: list[str] = []
        while True:
            name = self.expect_name(f"in {op.text}")
            self.column(name)
            names.append(name.text)
            if not self.at(","):
                return names
            self.advance()

    def project_away(self, op: _Token) -> None:
        removed = set(self.column_list(op))
        self.frame.columns = {n: t for n, t in self.frame.columns.items() if n not in removed}
        self.frame.stages.append(
            lambda rows: [{k: v for k, v in row.items() if k not in removed} for row in rows]
        )

    def distinct(self, op: _Token) -> None:
        if self.at("*"):
            self.advance()
            names = list(self.frame.columns)
        else:
            names = self.column_list(op)
        self.frame.columns = {name: self.frame.columns.get(name, DYNAMIC) for name in names}
        self.frame.open = False

        def run(rows: list[Row]) -> list[Row]:
            seen: dict[tuple[Any, ...], Row] = {}
            for row in rows:
                values = {name: row.get(name) for name in names}
                seen.setdefault(tuple(_hashable(v) for v in values.values()), values)
            return list(seen.values())

        self.frame.stages.append(run)

    def take(self, op: _Token) -> None:
        count = self.row_count(op)
        self.frame.stages.append(lambda rows: rows[:count])

    def row_count(self, op: _Token) -> int:
        token = self.advance()
        if token.kind != "number" or not isinstance(token.value, int):
            raise self.fail(token, f"{op.text} needs a whole number of rows, found {_show(token)}")
        return int(token.value)

    def top(self, op: _Token) -> None:
        count = self.row_count(op)
        self.expect("by", f"after '{op.text} {count}'")
        key = self.sort_key()
        self.frame.stages.append(lambda rows: _sorted(rows, [key])[:count])

    def order(self, op: _Token) -> None:
        self.expect("by", f"after '{op.text}'")
        keys = [self.sort_key()]
        while self.at(","):
            self.advance()
            keys.append(self.sort_key())
        self.frame.stages.append(lambda rows: _sorted(rows, keys))

    def sort_key(self) -> tuple[Callable[[Row], Any], bool, bool]:
        """expression [asc|desc] [nulls first|last] -> (compute, descending, nulls_first)."""
        expr = self.expression()
        descending = True
        if self.at("asc") or self.at("desc"):
            descending = self.advance().text == "desc"
        nulls_first = not descending
        if self.at("nulls"):
            self.advance()
            if not (self.at("first") or self.at("last")):
                raise self.fail(self.token, f"expected first or last, found {_show(self.token)}")
            nulls_first = self.advance().text == "first"
        return expr.compute, descending, nulls_first

    def count(self, _op: _Token) -> None:
        self.frame.columns = {"Count": INT}
        self.frame.open = False
        self.frame.stages.append(lambda rows: [{"Count": len(rows)}])

    # -- summarize -------------------------------------------------------------------------

    def summarize(self, op: _Token) -> None:
        """``summarize [Name =] agg, ... [by A, B]``; output: the by columns, then aggregates."""
        if self.token.kind == "end" or self.at("|"):
            raise self.fail(self.token, "summarize needs an aggregation or a by clause")
        specs: list[_Register] = []
        if not self.at("by"):
            while True:
                first = self.expect_name("in summarize")
                name: str | None = None
                function = first
                if self.at("="):
                    self.advance()
                    name = first.text
                    function = self.expect_name("after '='")
                specs.append(self.aggregate(name, function))
                if not self.at(","):
                    break
                self.advance()
        keys: list[str] = []
        if self.at("by"):
            self.advance()
            keys = self.column_list(op)
        output = {key: self.column_type(key) for key in keys}
        computations = [register(output) for register in specs]
        self.frame.columns = output
        self.frame.open = False

        def run(rows: list[Row]) -> list[Row]:
            groups: dict[tuple[Any, ...], list[Row]] = {}
            for row in rows:
                groups.setdefault(tuple(_hashable(row.get(k)) for k in keys), []).append(row)
            if not keys and not groups:
                groups[()] = []  # like KQL, summarize without by yields one row
            result: list[Row] = []
            for members in groups.values():
                out: dict[str, Any] = {k: members[0].get(k) for k in keys} if members else {}
                for compute in computations:
                    out.update(compute(members))
                result.append(out)
            return result

        self.frame.stages.append(run)

    def aggregate(self, name: str | None, function: _Token) -> _Register:
        """Parse one aggregation call now; the returned function later adds its output columns
        (after the by columns, which come first) and gives back its computation."""
        fn = function.text
        if fn not in ("count", "dcount", "min", "max", "arg_max", "arg_min"):
            raise self.fail(function, f"unsupported aggregation function '{fn}'")
        self.expect("(", f"after '{fn}'")
        if fn == "count":
            self.expect(")", "after 'count('")

            def register_count(output: dict[str, str]) -> _Aggregate:
                column = _unique(name or "count_", output)
                output[column] = INT
                return lambda rows: {column: len(rows)}

            return register_count
        if fn in ("dcount", "min", "max"):
            arg = self.expect_name(f"in {fn}(")
            kind = INT if fn == "dcount" else self.column(arg)
            self.expect(")", f"to close {fn}(")

            def register_simple(output: dict[str, str]) -> _Aggregate:
                column = _unique(name or f"{fn}_{arg.text}", output)
                output[column] = kind
                return _simple_aggregate(fn, arg.text, column)

            return register_simple
        if name is not None:
            raise self.fail(function, f"{fn}() cannot be given a name")
        return self.arg_extreme(function)

    def arg_extreme(self, function: _Token) -> _Register:
        """``arg_max(Key, *)`` / ``arg_max(Key, A, B)``: columns of the row with the extreme key
        (nulls ignored; the first such row on ties)."""
        key = self.expect_name(f"in {function.text}(")
        self.column(key)
        wanted: list[str] = []
        while self.at(","):
            self.advance()
            if self.at("*"):
                self.advance()
                wanted.append("*")
            else:
                column = self.expect_name(f"in {function.text}(")
                self.column(column)
                wanted.append(column.text)
        self.expect(")", f"to close {function.text}(")
        key_name = key.text
        pick = max if function.text == "arg_max" else min
        source_columns = list(self.frame.columns)

        def register(output: dict[str, str]) -> _Aggregate:
            sources = [key_name]
            for item in wanted:
                if item == "*":
                    sources.extend(c for c in source_columns if c != key_name and c not in output)
                else:
                    sources.append(item)
            renames: list[tuple[str, str]] = []
            for source in sources:
                target = _unique(source, output)
                output[target] = self.column_type(source)
                renames.append((target, source))

            def compute(rows: list[Row]) -> dict[str, Any]:
                candidates = [row for row in rows if row.get(key_name) is not None]
                chosen: Row | None = rows[0] if rows else None
                if candidates:
                    chosen = pick(candidates, key=lambda row: _sort_key(row.get(key_name)))
                return {t: (chosen.get(s) if chosen else None) for t, s in renames}

            return compute

        return register

    def column_type(self, name: str) -> str:
        return self.frame.columns.get(name, DYNAMIC)

    # -- expressions -----------------------------------------------------------------------

    def expression(self) -> _Expr:
        """expression := conjunction ('or' conjunction)*"""
        left_token = self.token
        left = self.conjunction()
        while self.at("or"):
            self.advance()
            right_token = self.token
            right = self.conjunction()
            self.require_bool(left, left_token, "or")
            self.require_bool(right, right_token, "or")
            left = _logical(left, right, conjunction=False)
        return left

    def conjunction(self) -> _Expr:
        """conjunction := comparison ('and' comparison)*"""
        left_token = self.token
        left = self.comparison()
        while self.at("and"):
            self.advance()
            right_token = self.token
            right = self.comparison()
            self.require_bool(left, left_token, "and")
            self.require_bool(right, right_token, "and")
            left = _logical(left, right, conjunction=True)
        return left

    def require_bool(self, expr: _Expr, token: _Token, where: str) -> None:
        if expr.type not in (BOOL, DYNAMIC):
            raise self.semantic(
                token, f"'{where}' needs bool operands, got {_KQL_TYPE_NAMES[expr.type]}"
            )

    def comparison(self) -> _Expr:
        """comparison := additive [compare-op additive | string-op additive | in-op list]"""
        left = self.additive()
        token = self.token
        if token.kind == "punct" and (token.text in _EQUALITIES or token.text in _ORDERINGS):
            self.advance()
            right = self.additive()
            return self.compare(token, left, right)
        if token.kind != "ident":
            return left
        if token.text in _IN_OPERATORS:
            self.advance()
            return self.membership(token, left)
        string_op = _string_operator(token.text)
        if string_op is not None:
            self.advance()
            right_token = self.token
            right = self.additive()
            if right.type not in (STRING, DYNAMIC):
                raise self.semantic(
                    right_token,
                    f"'{token.text}' needs a string on the right, got "
                    f"{_KQL_TYPE_NAMES[right.type]}",
                )
            return _string_test(left, right, *string_op)
        if token.text not in _FOLLOWERS:
            raise self.fail(token, f"unsupported operator '{token.text}'")
        return left

    def compare(self, op: _Token, left: _Expr, right: _Expr) -> _Expr:
        symbol = op.text
        mismatch = KqlError(
            f"Cannot compare values of types {_KQL_TYPE_NAMES[left.type]} and "
            f"{_KQL_TYPE_NAMES[right.type]} with '{symbol}' ({_location(self.query, op.pos)})"
        )
        if not _same_family(left.type, right.type):
            raise mismatch
        lhs, rhs = left.compute, right.compute
        if symbol in _ORDERINGS:
            if {left.type, right.type} & {STRING, BOOL}:
                raise mismatch
            test = _ORDERINGS[symbol]

            def ordered(row: Row) -> bool:
                a, b = _normalize(lhs(row)), _normalize(rhs(row))
                if a is None or b is None:
                    return False
                try:
                    return bool(test(a, b))
                except TypeError:  # only possible with Dynamic values
                    return False

            return _Expr(BOOL, ordered, left.constant and right.constant)
        if symbol in ("=~", "!~") and not {left.type, right.type} <= {STRING, DYNAMIC}:
            raise mismatch
        ignore_case = symbol in ("=~", "!~")
        negate = symbol in ("!=", "!~")
        strings = STRING in (left.type, right.type)

        def equality(row: Row) -> bool:
            a, b = lhs(row), rhs(row)
            if strings:
                a, b = _to_text(a) if a is None else a, _to_text(b) if b is None else b
            same = _equal(a, b, ignore_case=ignore_case)
            if same is None:
                return False
            return same != negate

        return _Expr(BOOL, equality, left.constant and right.constant)

    def membership(self, op: _Token, left: _Expr) -> _Expr:
        """``in``, ``!in``, ``in~``, ``!in~`` followed by a parenthesized list of constants."""
        self.expect("(", f"after '{op.text}'")
        values: list[Any] = []
        while True:
            token = self.token
            item = self.additive()
            if not item.constant:
                raise self.fail(token, f"'{op.text}' lists take constants only")
            values.append(item.compute({}))
            if not self.at(","):
                break
            self.advance()
        self.expect(")", f"to close the '{op.text}' list")
        ignore_case = op.text.endswith("~")
        negate = op.text.startswith("!")
        compute = left.compute
        text_like = left.type in (STRING, DYNAMIC)

        def member(row: Row) -> bool:
            value = compute(row)
            if value is None and text_like:
                value = ""
            found = any(_equal(value, v, ignore_case=ignore_case) for v in values)
            return found != negate

        return _Expr(BOOL, member)

    def additive(self) -> _Expr:
        """additive := unary (('+'|'-') unary)*"""
        left = self.unary()
        while self.token.kind == "punct" and self.token.text in ("+", "-"):
            op = self.advance()
            right = self.unary()
            left = self.arithmetic(op, left, right)
        return left

    def arithmetic(self, op: _Token, left: _Expr, right: _Expr) -> _Expr:
        types = (left.type, right.type)
        result: str | None = None
        if left.type in _NUMERIC and right.type in _NUMERIC:
            result = INT if types == (INT, INT) else REAL
        elif types in ((DATETIME, TIMESPAN), (TIMESPAN, TIMESPAN)):
            result = left.type
        elif types == (TIMESPAN, DATETIME) and op.text == "+":
            result = DATETIME
        elif types == (DATETIME, DATETIME) and op.text == "-":
            result = TIMESPAN
        elif DYNAMIC in types:
            result = DYNAMIC
        if result is None:
            raise self.semantic(
                op,
                f"operator '{op.text}' does not apply to {_KQL_TYPE_NAMES[left.type]} and "
                f"{_KQL_TYPE_NAMES[right.type]}",
            )
        fn = operator.add if op.text == "+" else operator.sub
        lhs, rhs = left.compute, right.compute

        def compute(row: Row) -> Any:
            a, b = _normalize(lhs(row)), _normalize(rhs(row))
            if a is None or b is None:
                return None
            try:
                return fn(a, b)
            except TypeError:  # only possible with Dynamic values
                return None

        return _Expr(result, compute, left.constant and right.constant)

    def unary(self) -> _Expr:
        """unary := '-' unary | primary"""
        if self.at("-"):
            op = self.advance()
            operand = self.unary()
            if operand.type not in (INT, REAL, TIMESPAN):
                raise self.semantic(
                    op, f"unary '-' does not apply to {_KQL_TYPE_NAMES[operand.type]}"
                )
            compute = operand.compute
            return _Expr(
                operand.type,
                lambda row: None if (v := compute(row)) is None else -v,
                operand.constant,
            )
        return self.primary()

    def primary(self) -> _Expr:
        """primary := '(' expression ')' | literal | function '(' args ')' | column"""
        token = self.advance()
        if token.kind == "punct" and token.text == "(":
            expr = self.expression()
            if not self.at(")"):
                raise self.fail(
                    self.token,
                    f"missing ')' to close the '(' opened at {_location(self.query, token.pos)}",
                )
            self.advance()
            return expr
        literal_types = {"string": STRING, "timespan": TIMESPAN, "datetime": DATETIME}
        if token.kind in literal_types:
            return _constant(token.value, literal_types[token.kind])
        if token.kind == "number":
            return _constant(token.value, INT if isinstance(token.value, int) else REAL)
        if token.kind == "end":
            raise self.fail(token, "unexpected end of query; expected a value")
        if token.kind != "ident":
            raise self.fail(token, f"unexpected {_show(token)}; expected a value")
        if token.text.lower() in ("true", "false"):
            return _constant(token.text.lower() == "true", BOOL)
        if self.at("("):
            return self.call(token)
        if token.text in _RESERVED:
            raise self.fail(token, f"unexpected {_show(token)}; expected a value")
        return _Expr(self.column(token), _getter(token.text))

    def call(self, name: _Token) -> _Expr:
        """A scalar function call."""
        self.advance()  # the "("
        args: list[tuple[_Token, _Expr]] = []
        if not self.at(")"):
            while True:
                args.append((self.token, self.expression()))
                if not self.at(","):
                    break
                self.advance()
        self.expect(")", f"to close '{name.text}('")
        fn = name.text
        arity = _FUNCTION_ARITY.get(fn)
        if arity is None:
            supported = ", ".join(sorted(_FUNCTION_ARITY))
            raise self.semantic(name, f"Unknown function '{fn}'; supported: {supported}")
        if len(args) != arity:
            raise self.semantic(name, f"'{fn}' takes {arity} argument(s), got {len(args)}")
        if fn == "now":
            return _constant(self.now, DATETIME)
        token, arg = args[0]
        if fn == "ago":
            if arg.type != TIMESPAN:
                raise self.semantic(
                    token, f"ago() needs a timespan, got {_KQL_TYPE_NAMES[arg.type]}"
                )
            now, span = self.now, arg.compute
            return _Expr(DATETIME, lambda row: now - span(row), arg.constant)
        if fn == "not":
            self.require_bool(arg, token, "not")
            inner = arg.compute
            return _Expr(BOOL, lambda row: inner(row) is not True, arg.constant)
        compute = arg.compute
        if fn in ("tolower", "toupper"):
            change = str.lower if fn == "tolower" else str.upper
            return _Expr(STRING, lambda row: change(_to_text(compute(row))), arg.constant)
        emptiness: dict[str, Callable[[Any], bool]] = {
            "isempty": lambda v: v is None or v == "",
            "isnotempty": lambda v: not (v is None or v == ""),
            "isnull": lambda v: v is None,
            "isnotnull": lambda v: v is not None,
        }
        check = emptiness[fn]
        return _Expr(BOOL, lambda row: check(compute(row)), arg.constant)


_FUNCTION_ARITY: Final = {
    "now": 0,
    "ago": 1,
    "not": 1,
    "isempty": 1,
    "isnotempty": 1,
    "isnull": 1,
    "isnotnull": 1,
    "tolower": 1,
    "toupper": 1,
}
_RESERVED: Final = frozenset({"and", "or", "not", "by", "asc", "desc", "in", "!in", "in~", "!in~"})
# Words that may follow a complete expression: anything else there is an unsupported operator.
_FOLLOWERS: Final = frozenset({"and", "or", "asc", "desc", "nulls"})


def _getter(name: str) -> Callable[[Row], Any]:
    """Read column ``name`` from a row (None when absent)."""
    return lambda row: row.get(name)


def _show(token: _Token) -> str:
    return "end of query" if token.kind == "end" else f"'{token.text}'"


def _unique(name: str, taken: Mapping[str, Any]) -> str:
    """``name``, or ``name1``, ``name2``... if taken (KQL's rule for clashing output names)."""
    if name not in taken:
        return name
    suffix = 1
    while f"{name}{suffix}" in taken:
        suffix += 1
    return f"{name}{suffix}"


def _logical(left: _Expr, right: _Expr, *, conjunction: bool) -> _Expr:
    lhs, rhs = left.compute, right.compute
    if conjunction:
        return _Expr(BOOL, lambda row: lhs(row) is True and rhs(row) is True)
    return _Expr(BOOL, lambda row: lhs(row) is True or rhs(row) is True)


def _string_test(
    left: _Expr,
    right: _Expr,
    test: Callable[[str, str], bool],
    case_sensitive: bool,
    negated: bool,
) -> _Expr:
    lhs, rhs = left.compute, right.compute

    def compute(row: Row) -> bool:
        haystack, needle = _to_text(lhs(row)), _to_text(rhs(row))
        if not case_sensitive:
            haystack, needle = haystack.casefold(), needle.casefold()
        return test(haystack, needle) != negated

    return _Expr(BOOL, compute)


def _simple_aggregate(fn: str, source: str, column: str) -> Callable[[list[Row]], dict[str, Any]]:
    """``dcount``, ``min`` or ``max`` over the non-null values of ``source``."""

    def compute(rows: list[Row]) -> dict[str, Any]:
        values = [row.get(source) for row in rows if row.get(source) is not None]
        if fn == "dcount":
            return {column: len({_hashable(v) for v in values})}
        if not values:
            return {column: None}
        pick = max if fn == "max" else min
        return {column: pick(values, key=_sort_key)}

    return compute


def _sorted(rows: list[Row], keys: list[tuple[Callable[[Row], Any], bool, bool]]) -> list[Row]:
    """Stable multi-key sort; each key is (compute, descending, nulls_first)."""
    result = list(rows)
    for compute, descending, nulls_first in reversed(keys):
        present = [row for row in result if compute(row) is not None]
        missing = [row for row in result if compute(row) is None]
        present.sort(key=lambda row: _sort_key(compute(row)), reverse=descending)
        result = missing + present if nulls_first else present + missing
    return result


def run_query(
    query: str,
    tables: Mapping[str, Sequence[Mapping[str, Any]]],
    *,
    now: datetime,
    schemas: Mapping[str, Mapping[str, str]] | None = None,
) -> tuple[list[dict[str, str]], list[dict[str, Any]]]:
    """Run a KQL query over in-memory tables; return ``(schema, rows)`` as MDE's API does.

    ``tables`` maps table names (case-sensitive) to rows; ``now`` anchors ``now()`` and
    ``ago()`` (naive means UTC); ``schemas`` optionally states a table's columns and types
    (``{"DeviceInfo": {"DeviceId": "String", ...}}``) instead of inferring them from the rows.
    The whole query is parsed and checked before any row is touched. Raises ``KqlError``.
    """
    parser = _Parser(query, now)
    rows: list[Row] = list(parser.table(tables, schemas or {}))
    for stage in parser.frame.stages:
        rows = stage(rows)
    columns = parser.frame.columns
    schema = [{"Name": name, "Type": kind} for name, kind in columns.items()]
    return schema, [{name: _render(row.get(name)) for name in columns} for row in rows]
