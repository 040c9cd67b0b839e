"""A small, honest OData v4 ``$filter`` engine for the emulator's list endpoints.

``parse_filter`` parses an expression once and returns a predicate over an entity dict. What it
accepts (mde-api.md sections 3 and 4, plus the common OData operators MDE is likely to share):

* comparisons ``prop op literal`` (or ``literal op prop``) with ``eq ne gt ge lt le``;
* ``and``, ``or``, ``not`` and parentheses, with OData precedence: ``not`` binds to the operand
  right after it, then comparisons, then ``and``, then ``or``. So ``not contains(x, 'y')`` and
  ``not (x eq 'y')`` work, while ``not x eq 'y'`` is rejected as OData's own parser rejects it;
* ``prop in ('a', 'b')``;
* ``startswith``, ``endswith``, ``contains`` (two arguments, true or false) and ``tolower``,
  ``toupper`` (one argument, a value to compare);
* ``tags/any(t: t eq 'X')``, ``tags/any()`` (the collection is not empty), ``tags/all(t: ...)``;
* literals: ``'single quoted'`` strings with ``''`` for a quote, integers and decimals (negative
  allowed), ``true``, ``false``, ``null``, and unquoted ISO 8601 datetimes or dates
  (``2024-01-01T00:00:00Z``, ``2024-01-01T00:00:00.123+02:00``, ``2018-08-01``, ``2018-08-01Z``).

Keywords, function names and property names are case-insensitive; a property name is matched to
the allowed set and then read from the entity under its canonical spelling.

Comparison semantics, chosen to be forgiving where MDE's data is loose (mde-api.md section 4 says
to compare enum-like strings case-insensitively, and ``rbacGroupId`` is a number in examples but a
string in the docs):

* strings compare case-insensitively, for ``eq``/``ne`` and for ordering alike;
* a number against a numeric string compares numerically (``rbacGroupId eq '140'`` matches 140);
* a datetime literal against an ISO 8601 entity string compares as aware datetimes (a value with
  no offset is taken as UTC); two strings that both read as ISO 8601 datetimes also compare as
  datetimes, so a quoted datetime literal works too;
* ``null``: ``eq null`` matches a missing or ``None`` value, ``ne null`` a present one; ordering
  against a missing value is always false;
* values that cannot be compared (a string against a list, a boolean against a number) are not
  equal: ``eq`` and the ordering operators are false, ``ne`` is true.

Anything else raises ``ODataError`` with a one-line message naming the token and its position
(0-based character offset into the filter text).
"""

from __future__ import annotations

import operator
import re
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta, timezone
from typing import Any, Final

__all__ = ["ODataError", "parse_datetime", "parse_filter"]


class ODataError(ValueError):
    """A ``$filter`` the emulator cannot honour; the message names the culprit and its position."""


# --------------------------------------------------------------------------------------------
# Datetimes
# --------------------------------------------------------------------------------------------

_DATETIME_RE: Final = re.compile(
    r"(?P<date>\d{4}-\d{2}-\d{2})"
    r"(?:[Tt](?P<hour>\d{2}):(?P<minute>\d{2})(?::(?P<second>\d{2})(?:\.(?P<fraction>\d+))?)?)?"
    r"(?P<offset>[Zz]|[+-]\d{2}:\d{2})?"
)


def parse_datetime(text: str) -> datetime | None:
    """Read an ISO 8601 datetime or date as an aware datetime, or return None if it is not one.

    Accepts any number of fractional-second digits (MDE sends seven; the extra ones are
    truncated to microseconds), ``Z`` or a ``+hh:mm`` offset, and no offset (taken as UTC).
    """
    match = _DATETIME_RE.fullmatch(text.strip())
    if match is None:
        return None
    try:
        day = datetime.strptime(match["date"], "%Y-%m-%d")
        fraction = (match["fraction"] or "").ljust(6, "0")[:6]
        value = day.replace(
            hour=int(match["hour"] or 0),
            minute=int(match["minute"] or 0),
            second=int(match["second"] or 0),
            microsecond=int(fraction),
        )
        offset = match["offset"]
        if offset is None or offset in "Zz":
            return value.replace(tzinfo=UTC)
        sign = -1 if offset[0] == "-" else 1
        delta = timedelta(hours=int(offset[1:3]), minutes=int(offset[4:6]))
        return value.replace(tzinfo=timezone(sign * delta))
    except ValueError:
        return None


# --------------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class _Token:
    """One lexical token: its kind, its source text, its literal value (if any) and position."""

    kind: str  # "ident", "string", "number", "datetime", "punct" or "end"
    text: str
    value: Any
    pos: int


_NUMBER_RE: Final = re.compile(r"-?\d+(?:\.\d+)?(?:[eE][+-]?\d+)?")
_IDENT_RE: Final = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_WORD_RE: Final = re.compile(r"[-+\w.:]+")
_PUNCT: Final = frozenset("(),:/")


def _tokenize(text: str) -> list[_Token]:
    """Split a filter into tokens, raising ODataError on a character or literal it cannot read."""
    tokens: list[_Token] = []
    pos = 0
    while pos < len(text):
        char = text[pos]
        if char.isspace():
            pos += 1
            continue
        if char == "'":
            pos = _read_string(text, pos, tokens)
            continue
        if char in _PUNCT:
            tokens.append(_Token("punct", char, None, pos))
            pos += 1
            continue
        dt_match = _DATETIME_RE.match(text, pos)
        if dt_match is not None:
            raw = dt_match.group()
            _check_literal_end(text, pos, dt_match.end())
            value = parse_datetime(raw)
            if value is None:
                raise ODataError(f"invalid datetime literal '{raw}' at position {pos}")
            tokens.append(_Token("datetime", raw, value, pos))
            pos = dt_match.end()
            continue
        num_match = _NUMBER_RE.match(text, pos)
        if num_match is not None:
            raw = num_match.group()
            _check_literal_end(text, pos, num_match.end())
            number: int | float = int(raw) if raw.lstrip("-").isdigit() else float(raw)
            tokens.append(_Token("number", raw, number, pos))
            pos = num_match.end()
            continue
        ident_match = _IDENT_RE.match(text, pos)
        if ident_match is not None:
            tokens.append(_Token("ident", ident_match.group(), None, pos))
            pos = ident_match.end()
            continue
        raise ODataError(f"unexpected character '{char}' at position {pos}")
    tokens.append(_Token("end", "", None, len(text)))
    return tokens


def _read_string(text: str, start: int, tokens: list[_Token]) -> int:
    """Read a single-quoted string at ``start`` (``''`` is a quote); return the position after."""
    chars: list[str] = []
    pos = start + 1
    while pos < len(text):
        if text[pos] == "'":
            if text.startswith("''", pos):
                chars.append("'")
                pos += 2
                continue
            tokens.append(_Token("string", text[start : pos + 1], "".join(chars), start))
            return pos + 1
        chars.append(text[pos])
        pos += 1
    raise ODataError(f"unterminated string literal starting at position {start}")


def _check_literal_end(text: str, start: int, end: int) -> None:
    """Reject a number or datetime glued to more characters, such as an unquoted GUID."""
    if end < len(text) and (text[end].isalnum() or text[end] in "_.:+-"):
        word = _WORD_RE.match(text, start)
        raw = word.group() if word is not None else text[start:end]
        raise ODataError(
            f"malformed literal '{raw}' at position {start}; string values need single quotes"
        )


# --------------------------------------------------------------------------------------------
# Syntax tree and evaluation
# --------------------------------------------------------------------------------------------

# An evaluation scope: the entity, and the values bound to lambda variables.
_Scope = tuple[Mapping[str, Any], Mapping[str, Any]]


class _Node:
    """A parsed expression; ``is_condition`` says whether it yields true/false."""

    def is_condition(self) -> bool:
        """Whether this node is a condition (true/false) rather than a plain value."""
        return False

    def evaluate(self, scope: _Scope) -> Any:
        """Compute this node's value for one entity."""
        raise NotImplementedError


@dataclass(slots=True)
class _Literal(_Node):
    value: Any

    def is_condition(self) -> bool:
        return isinstance(self.value, bool)

    def evaluate(self, scope: _Scope) -> Any:
        return self.value


@dataclass(slots=True)
class _Property(_Node):
    name: str

    def evaluate(self, scope: _Scope) -> Any:
        return _lookup(scope[0], self.name)


@dataclass(slots=True)
class _Variable(_Node):
    name: str

    def evaluate(self, scope: _Scope) -> Any:
        return scope[1][self.name]


@dataclass(slots=True)
class _Compare(_Node):
    op: str
    left: _Node
    right: _Node

    def is_condition(self) -> bool:
        return True

    def evaluate(self, scope: _Scope) -> bool:
        return _compare(self.op, self.left.evaluate(scope), self.right.evaluate(scope))


@dataclass(slots=True)
class _In(_Node):
    operand: _Node
    choices: list[Any]

    def is_condition(self) -> bool:
        return True

    def evaluate(self, scope: _Scope) -> bool:
        value = self.operand.evaluate(scope)
        return any(_compare("eq", value, choice) for choice in self.choices)


@dataclass(slots=True)
class _And(_Node):
    left: _Node
    right: _Node

    def is_condition(self) -> bool:
        return True

    def evaluate(self, scope: _Scope) -> bool:
        return self.left.evaluate(scope) is True and self.right.evaluate(scope) is True


@dataclass(slots=True)
class _Or(_Node):
    left: _Node
    right: _Node

    def is_condition(self) -> bool:
        return True

    def evaluate(self, scope: _Scope) -> bool:
        return self.left.evaluate(scope) is True or self.right.evaluate(scope) is True


@dataclass(slots=True)
class _Not(_Node):
    operand: _Node

    def is_condition(self) -> bool:
        return True

    def evaluate(self, scope: _Scope) -> bool:
        return self.operand.evaluate(scope) is not True


@dataclass(slots=True)
class _TextTest(_Node):
    """``startswith``, ``endswith`` or ``contains``, case-insensitive."""

    test: Callable[[str, str], bool]
    subject: _Node
    needle: _Node

    def is_condition(self) -> bool:
        return True

    def evaluate(self, scope: _Scope) -> bool:
        subject = _as_text(self.subject.evaluate(scope))
        needle = _as_text(self.needle.evaluate(scope))
        if subject is None or needle is None:
            return False
        return self.test(subject.casefold(), needle.casefold())


@dataclass(slots=True)
class _Transform(_Node):
    """``tolower`` or ``toupper``: a string in, a string out; anything else passes through."""

    transform: Callable[[str], str]
    operand: _Node

    def evaluate(self, scope: _Scope) -> Any:
        value = self.operand.evaluate(scope)
        return self.transform(value) if isinstance(value, str) else value


@dataclass(slots=True)
class _Lambda(_Node):
    """``collection/any(v: body)``, ``collection/any()`` or ``collection/all(v: body)``."""

    collection: _Property
    quantifier: str  # "any" or "all"
    variable: str | None
    body: _Node | None

    def is_condition(self) -> bool:
        return True

    def evaluate(self, scope: _Scope) -> bool:
        items = self.collection.evaluate(scope)
        if items is None:
            items = []
        if not isinstance(items, list | tuple):
            return False
        if self.body is None or self.variable is None:
            return len(items) > 0
        entity, bound = scope
        results = (
            self.body.evaluate((entity, {**bound, self.variable: item})) is True for item in items
        )
        return any(results) if self.quantifier == "any" else all(results)


def _lookup(entity: Mapping[str, Any], name: str) -> Any:
    """Read ``name`` from the entity, falling back to a case-insensitive key match."""
    if name in entity:
        return entity[name]
    lowered = name.lower()
    for key, value in entity.items():
        if key.lower() == lowered:
            return value
    return None


def _as_text(value: Any) -> str | None:
    """A string for the text functions: strings as they are, numbers spelled out, else None."""
    if isinstance(value, str):
        return value
    if isinstance(value, int | float) and not isinstance(value, bool):
        return str(value)
    return None


_PLAIN_NUMBER_RE: Final = re.compile(r"\s*-?\d+(?:\.\d+)?\s*")


def _as_number(value: Any) -> int | float | None:
    """A number from a number or a numeric string, else None (callers rule out booleans)."""
    if isinstance(value, int | float):
        return value
    if isinstance(value, str) and _PLAIN_NUMBER_RE.fullmatch(value):
        text = value.strip()
        return int(text) if text.lstrip("-").isdigit() else float(text)
    return None


def _as_datetime(value: Any) -> datetime | None:
    """An aware datetime from a datetime (naive taken as UTC) or an ISO 8601 string, else None."""
    if isinstance(value, datetime):
        return value if value.tzinfo is not None else value.replace(tzinfo=UTC)
    if isinstance(value, str):
        return parse_datetime(value)
    return None


def _coerce(left: Any, right: Any) -> tuple[Any, Any] | None:
    """Bring two non-None values to a common comparable form, or None if they do not compare."""
    if isinstance(left, bool) or isinstance(right, bool):
        return (left, right) if isinstance(left, bool) and isinstance(right, bool) else None
    if isinstance(left, datetime) or isinstance(right, datetime):
        left_dt, right_dt = _as_datetime(left), _as_datetime(right)
        return None if left_dt is None or right_dt is None else (left_dt, right_dt)
    if isinstance(left, int | float) or isinstance(right, int | float):
        left_num, right_num = _as_number(left), _as_number(right)
        return None if left_num is None or right_num is None else (left_num, right_num)
    if isinstance(left, str) and isinstance(right, str):
        left_dt, right_dt = parse_datetime(left), parse_datetime(right)
        if left_dt is not None and right_dt is not None:
            return left_dt, right_dt
        return left.casefold(), right.casefold()
    return None


_OPERATORS: Final[dict[str, Callable[[Any, Any], bool]]] = {
    "eq": operator.eq,
    "ne": operator.ne,
    "gt": operator.gt,
    "ge": operator.ge,
    "lt": operator.lt,
    "le": operator.le,
}


def _compare(op: str, left: Any, right: Any) -> bool:
    """Apply an OData comparison operator with the coercions described in the module docstring."""
    if left is None or right is None:
        both_null = left is None and right is None
        if op == "eq":
            return both_null
        if op == "ne":
            return not both_null
        return False
    pair = _coerce(left, right)
    if pair is None:
        return op == "ne"
    return bool(_OPERATORS[op](*pair))


# --------------------------------------------------------------------------------------------
# Parser
# --------------------------------------------------------------------------------------------

_TEXT_TESTS: Final[dict[str, Callable[[str, str], bool]]] = {
    "startswith": str.startswith,
    "endswith": str.endswith,
    "contains": lambda haystack, needle: needle in haystack,
}
_TRANSFORMS: Final[dict[str, Callable[[str], str]]] = {"tolower": str.lower, "toupper": str.upper}
_FUNCTIONS: Final = ", ".join(sorted([*_TEXT_TESTS, *_TRANSFORMS]))
_KEYWORDS: Final = frozenset(
    {"and", "or", "not", "in", "true", "false", "null", *_OPERATORS, "any", "all"}
)


class _Parser:
    """Recursive descent over the token list; one instance parses one filter."""

    def __init__(self, text: str, properties: Collection[str]) -> None:
        self._tokens = _tokenize(text)
        self._index = 0
        self._properties = {name.lower(): name for name in properties}
        self._variables: list[str] = []

    # -- token helpers ---------------------------------------------------------------------

    @property
    def _token(self) -> _Token:
        return self._tokens[self._index]

    def _advance(self) -> _Token:
        token = self._tokens[self._index]
        if token.kind != "end":
            self._index += 1
        return token

    def _at_keyword(self, *words: str) -> bool:
        token = self._token
        return token.kind == "ident" and token.text.lower() in words

    def _at_punct(self, char: str) -> bool:
        return self._token.kind == "punct" and self._token.text == char

    def _expect_punct(self, char: str, context: str) -> _Token:
        if not self._at_punct(char):
            raise ODataError(f"expected '{char}' {context} but found {_describe(self._token)}")
        return self._advance()

    # -- grammar ---------------------------------------------------------------------------

    def parse(self) -> _Node:
        """filter := or_expr END, and the whole filter must be a condition."""
        if self._token.kind == "end":
            raise ODataError("empty $filter expression")
        start = self._token
        node = self._or()
        if self._token.kind != "end":
            extra = self._token
            hint = " (unbalanced parentheses)" if extra.text == ")" else ""
            raise ODataError(f"unexpected {_describe(extra)} after a complete expression{hint}")
        self._require_condition(node, start, "a $filter")
        return node

    def _or(self) -> _Node:
        """or_expr := and_expr ('or' and_expr)*"""
        left_token = self._token
        node = self._and()
        while self._at_keyword("or"):
            self._require_condition(node, left_token, "'or'")
            self._advance()
            right_token = self._token
            right = self._and()
            self._require_condition(right, right_token, "'or'")
            node = _Or(node, right)
        return node

    def _and(self) -> _Node:
        """and_expr := comparison ('and' comparison)*"""
        left_token = self._token
        node = self._comparison()
        while self._at_keyword("and"):
            self._require_condition(node, left_token, "'and'")
            self._advance()
            right_token = self._token
            right = self._comparison()
            self._require_condition(right, right_token, "'and'")
            node = _And(node, right)
        return node

    def _comparison(self) -> _Node:
        """comparison := unary [(eq|ne|gt|ge|lt|le) unary | 'in' '(' literal, ... ')']"""
        left = self._unary()
        token = self._token
        if token.kind == "ident" and token.text.lower() in _OPERATORS:
            self._advance()
            return _Compare(token.text.lower(), left, self._unary())
        if self._at_keyword("in"):
            self._advance()
            return _In(left, self._literal_list())
        return left

    def _literal_list(self) -> list[Any]:
        """'(' literal (',' literal)* ')' after ``in``."""
        self._expect_punct("(", "after 'in'")
        if self._at_punct(")"):
            raise ODataError(f"empty list after 'in' at position {self._token.pos}")
        values: list[Any] = []
        while True:
            token = self._token
            node = self._primary()
            if not isinstance(node, _Literal):
                raise ODataError(f"'in' lists take literals only, not {_describe(token)}")
            values.append(node.value)
            if not self._at_punct(","):
                break
            self._advance()
        self._expect_punct(")", "to close the 'in' list")
        return values

    def _unary(self) -> _Node:
        """unary := 'not' unary | primary"""
        if self._at_keyword("not"):
            self._advance()
            token = self._token
            operand = self._unary()
            if not operand.is_condition():
                raise ODataError(
                    f"'not' needs a condition but {_describe(token)} is a value; write not (a eq b)"
                )
            return _Not(operand)
        return self._primary()

    def _primary(self) -> _Node:
        """primary := '(' or_expr ')' | literal | function call | lambda | property | variable"""
        token = self._token
        if self._at_punct("("):
            self._advance()
            node = self._or()
            if not self._at_punct(")"):
                raise ODataError(
                    f"missing ')' to close '(' at position {token.pos}; "
                    f"found {_describe(self._token)}"
                )
            self._advance()
            return node
        if token.kind in {"string", "number", "datetime"}:
            self._advance()
            return _Literal(token.value)
        if token.kind == "ident":
            return self._identifier()
        if token.kind == "end":
            raise ODataError("unexpected end of $filter; expected a value")
        raise ODataError(f"unexpected {_describe(token)}; expected a value")

    def _identifier(self) -> _Node:
        """A keyword literal, a function call, a lambda variable or a (lambda over a) property."""
        token = self._advance()
        lowered = token.text.lower()
        if lowered in {"true", "false", "null"}:
            return _Literal({"true": True, "false": False, "null": None}[lowered])
        if self._at_punct("("):
            return self._call(token)
        if token.text in self._variables:
            if self._at_punct("/"):
                raise ODataError(f"unsupported path after lambda variable {_describe(token)}")
            return _Variable(token.text)
        if lowered in _KEYWORDS:
            raise ODataError(f"unexpected {_describe(token)}; expected a value")
        canonical = self._properties.get(lowered)
        if canonical is None:
            allowed = ", ".join(sorted(self._properties.values()))
            raise ODataError(
                f"property '{token.text}' (position {token.pos}) is not filterable; "
                f"allowed: {allowed}"
            )
        prop = _Property(canonical)
        if self._at_punct("/"):
            return self._lambda(prop)
        return prop

    def _call(self, name: _Token) -> _Node:
        """function := name '(' args ')' for the supported string functions."""
        lowered = name.text.lower()
        arity = 2 if lowered in _TEXT_TESTS else 1 if lowered in _TRANSFORMS else 0
        if arity == 0:
            raise ODataError(
                f"unknown function '{name.text}' at position {name.pos}; supported: {_FUNCTIONS}"
            )
        self._advance()  # the "("
        args: list[_Node] = []
        if not self._at_punct(")"):
            args.append(self._or())
            while self._at_punct(","):
                self._advance()
                args.append(self._or())
        self._expect_punct(")", f"to close {name.text}(")
        if len(args) != arity:
            raise ODataError(
                f"function '{name.text}' at position {name.pos} takes {arity} argument"
                f"{'s' if arity > 1 else ''}, got {len(args)}"
            )
        if lowered in _TEXT_TESTS:
            return _TextTest(_TEXT_TESTS[lowered], args[0], args[1])
        return _Transform(_TRANSFORMS[lowered], args[0])

    def _lambda(self, collection: _Property) -> _Node:
        """lambda := property '/' ('any'|'all') '(' [variable ':' or_expr] ')'"""
        self._advance()  # the "/"
        word = self._advance()
        quantifier = word.text.lower()
        if word.kind != "ident" or quantifier not in {"any", "all"}:
            raise ODataError(
                f"expected any or all after '{collection.name}/' but found {_describe(word)}"
            )
        self._expect_punct("(", f"after '{collection.name}/{word.text}'")
        if self._at_punct(")"):
            if quantifier == "all":
                raise ODataError(f"all() at position {word.pos} needs a lambda: all(x: ...)")
            self._advance()
            return _Lambda(collection, quantifier, None, None)
        variable = self._advance()
        if variable.kind != "ident" or variable.text.lower() in _KEYWORDS:
            raise ODataError(f"expected a lambda variable name but found {_describe(variable)}")
        self._expect_punct(":", f"after lambda variable '{variable.text}'")
        self._variables.append(variable.text)
        body_token = self._token
        body = self._or()
        self._variables.pop()
        self._require_condition(body, body_token, f"the {quantifier}() body")
        self._expect_punct(")", f"to close {collection.name}/{word.text}(")
        return _Lambda(collection, quantifier, variable.text, body)

    @staticmethod
    def _require_condition(node: _Node, token: _Token, where: str) -> None:
        if not node.is_condition():
            raise ODataError(
                f"{where} needs a condition, but {_describe(token)} starts a plain value"
            )


def _describe(token: _Token) -> str:
    """How an error message names a token."""
    if token.kind == "end":
        return "end of $filter"
    return f"'{token.text}' at position {token.pos}"


def parse_filter(text: str, properties: Collection[str]) -> Callable[[Mapping[str, Any]], bool]:
    """Parse an OData ``$filter`` once and return a predicate over entity dicts.

    ``properties`` is the set of filterable property names (matched case-insensitively; the
    entity is read under the spelling given here). Raises ``ODataError`` on anything outside the
    supported subset; see the module docstring for the syntax and comparison rules.
    """
    tree = _Parser(text, properties).parse()

    def predicate(entity: Mapping[str, Any]) -> bool:
        return tree.evaluate((entity, {})) is True

    return predicate
