"""A small, safe language for choosing nodes, and the placement key built on it.

A task may say which nodes it runs on (``select="gpu == 1 and mem_gb >= 8"``)
and what it needs while it runs (``resources={"cpus": 2}``). The selector is
parsed here by a tokenizer and a recursive-descent parser into a tree of
frozen dataclasses; nothing is ever ``eval``-ed, so a selector cannot run
code on the coordinator. Grammar (lowest precedence first)::

    expr    := and ("or" and)*
    and     := unary ("and" unary)*
    unary   := "not" unary | atom
    atom    := "(" expr ")" | name [op literal | ["not"] "in" list]
    op      := "==" | "!=" | "<" | "<=" | ">" | ">="
    list    := "[" [literal ("," literal)* [","]] "]"
    literal := "string" | 'string' | number | true | false
    name    := ident ("." ident)*

Names. ``labels.x``, ``data.x.y`` and ``resources.x`` name one source
explicitly. Any other name is looked up in the node's labels, then its
data (dots walk into nested objects), then its resources, then the
built-in facts (``node``: the node id). A bare name is true when the
fact is present and truthy.

Evaluation never raises: a comparison with a missing fact, or between
values that do not compare (a label ``"a"`` against ``< 3``), is false.
Labels are strings, so a number literal compares with a label that reads
as a number (``gpu == 1`` matches the label ``gpu=1``).

``str(tree)`` is canonical: equal selectors give equal text, which is
what the store indexes ready tasks by (:func:`constraint_key`), so the
coordinator matches a handful of distinct keys per node, not every task.
"""

from __future__ import annotations

import functools
import json
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Union

from herder.errors import HerderError

MAX_SELECTOR = 512  # characters: keeps the placement key within its column
MAX_DEPTH = 32  # nesting of parentheses and ``not``: no recursion blow-up
RESOURCE_NAMES = ("cpus", "mem_gb", "gpus", "disk_gb")


class SelectorError(HerderError, ValueError):
    """The selector is not valid."""

    # Also a ValueError, so a TaskSpec field validator that parses the
    # selector reports it as pydantic's ValidationError naming the field.


# ---------------------------------------------------------------------------
# Tree

Literal = Union[str, int, float, bool]  # noqa: UP007 (a runtime alias)


def _literal_text(value: Literal) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, str):
        return json.dumps(value)  # ASCII only, JSON escapes: parses back the same
    return repr(value)


@dataclass(frozen=True)
class Name:
    parts: tuple[str, ...]

    def __str__(self) -> str:
        return ".".join(self.parts)


@dataclass(frozen=True)
class Compare:
    name: Name
    op: str
    value: Literal

    def __str__(self) -> str:
        return f"{self.name} {self.op} {_literal_text(self.value)}"


@dataclass(frozen=True)
class In:
    name: Name
    values: tuple[Literal, ...]
    negated: bool = False

    def __str__(self) -> str:
        items = ", ".join(_literal_text(v) for v in self.values)
        return f"{self.name} {'not in' if self.negated else 'in'} [{items}]"


@dataclass(frozen=True)
class Truthy:
    name: Name

    def __str__(self) -> str:
        return str(self.name)


@dataclass(frozen=True)
class Not:
    operand: Node

    def __str__(self) -> str:
        return f"not {_wrap(self.operand, 3)}"


@dataclass(frozen=True)
class And:
    operands: tuple[Node, ...]

    def __str__(self) -> str:
        return " and ".join(_wrap(o, 2) for o in self.operands)


@dataclass(frozen=True)
class Or:
    operands: tuple[Node, ...]

    def __str__(self) -> str:
        return " or ".join(_wrap(o, 1) for o in self.operands)


Node = Union[Compare, In, Truthy, Not, And, Or]  # noqa: UP007


def _wrap(node: Node, level: int) -> str:
    """``node``'s text, in parentheses where it binds looser than ``level``."""
    binds = 1 if isinstance(node, Or) else 2 if isinstance(node, And) else 3
    return f"({node})" if binds < level else str(node)


# ---------------------------------------------------------------------------
# Tokens

_TOKEN = re.compile(
    r"""
    (?P<ws>\s+)
  | (?P<num>-?(?:\d+(?:\.\d*)?|\.\d+)(?:[eE][+-]?\d+)?)
  | (?P<str>"(?:[^"\\\x00-\x1f]|\\.)*"|'[^'\x00-\x1f]*')
  | (?P<ident>[A-Za-z_][A-Za-z0-9_-]*)
  | (?P<op>==|!=|<=|>=|<|>)
  | (?P<punct>[()\[\],.])
    """,
    re.VERBOSE,
)
_KEYWORDS = {"and", "or", "not", "in", "true", "false", "True", "False"}


@dataclass(frozen=True)
class _Tok:
    kind: str  # num, str, ident, kw, op, punct, end
    text: str
    pos: int
    value: Any = None


def _error(text: str, pos: int, what: str) -> SelectorError:
    """An error that shows the selector with a caret under the bad token."""
    shown = text.replace("\n", " ").replace("\t", " ")
    token = shown[pos : pos + 20].split(" ")[0] if pos < len(shown) else ""
    at = f"{token!r} at position {pos}" if token else f"the end (position {pos})"
    message = f"bad selector: {what} at {at}\n  {shown}\n  {' ' * pos}^"
    return SelectorError(message, selector=text, position=pos)


def _tokens(text: str) -> list[_Tok]:
    out: list[_Tok] = []
    pos = 0
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if m is None:
            raise _error(text, pos, "unexpected character")
        kind = m.lastgroup or ""
        raw = m.group()
        if kind == "num":
            value: Any = _number(text, pos, raw)
            out.append(_Tok("num", raw, pos, value))
        elif kind == "str":
            if raw.startswith('"'):
                try:
                    value = json.loads(raw)
                except ValueError:
                    raise _error(text, pos, "bad escape in string") from None
            else:
                value = raw[1:-1]
            out.append(_Tok("str", raw, pos, value))
        elif kind == "ident":
            out.append(_Tok("kw" if raw in _KEYWORDS else "ident", raw, pos))
        elif kind != "ws":
            out.append(_Tok(kind, raw, pos))
        pos = m.end()
    out.append(_Tok("end", "", len(text)))
    return out


def _number(text: str, pos: int, raw: str) -> int | float:
    if re.fullmatch(r"-?\d+", raw):
        if len(raw) > 30:
            raise _error(text, pos, "number too long")
        return int(raw)
    value = float(raw)
    if not math.isfinite(value):
        raise _error(text, pos, "number out of range")
    # 8.0 and 8 are one selector (and one placement key)
    return int(value) if value.is_integer() and abs(value) < 2**53 else value


# ---------------------------------------------------------------------------
# Parser


class _Parser:
    def __init__(self, text: str) -> None:
        self.text = text
        self.toks = _tokens(text)
        self.i = 0
        self.depth = 0

    @property
    def tok(self) -> _Tok:
        return self.toks[self.i]

    def take(self) -> _Tok:
        tok = self.toks[self.i]
        self.i += 1
        return tok

    def fail(self, what: str, tok: _Tok | None = None) -> SelectorError:
        return _error(self.text, (tok or self.tok).pos, what)

    def is_kw(self, word: str) -> bool:
        return self.tok.kind == "kw" and self.tok.text == word

    def parse(self) -> Node:
        if self.tok.kind == "end":
            raise self.fail("empty selector")
        node = self.expr()
        if self.tok.kind != "end":
            raise self.fail("expected 'and', 'or' or the end")
        return node

    def expr(self) -> Node:
        items = [self.conj()]
        while self.is_kw("or"):
            self.take()
            items.append(self.conj())
        return items[0] if len(items) == 1 else Or(_flat(Or, items))

    def conj(self) -> Node:
        items = [self.unary()]
        while self.is_kw("and"):
            self.take()
            items.append(self.unary())
        return items[0] if len(items) == 1 else And(_flat(And, items))

    def unary(self) -> Node:
        if self.is_kw("not"):
            self.nest()
            self.take()
            node: Node = Not(self.unary())
            self.depth -= 1
            return node
        return self.atom()

    def nest(self) -> None:
        self.depth += 1
        if self.depth > MAX_DEPTH:
            raise self.fail(f"nested deeper than {MAX_DEPTH}")

    def atom(self) -> Node:
        if self.tok.kind == "punct" and self.tok.text == "(":
            self.nest()
            self.take()
            node = self.expr()
            if not (self.tok.kind == "punct" and self.tok.text == ")"):
                raise self.fail("expected ')'")
            self.take()
            self.depth -= 1
            return node
        name = self.name()
        if self.tok.kind == "op":
            op = self.take().text
            return Compare(name, op, self.literal(f"a value after {op!r}"))
        negated = False
        if self.is_kw("not"):
            self.take()
            negated = True
            if not self.is_kw("in"):
                raise self.fail("expected 'in' after 'not'")
        if self.is_kw("in"):
            self.take()
            return In(name, self.values(), negated)
        return Truthy(name)

    def name(self) -> Name:
        if self.tok.kind != "ident":
            raise self.fail("expected a name or '('")
        parts = [self.take().text]
        while self.tok.kind == "punct" and self.tok.text == ".":
            self.take()
            if self.tok.kind not in ("ident", "kw"):
                raise self.fail("expected a name after '.'")
            parts.append(self.take().text)
        return Name(tuple(parts))

    def literal(self, what: str) -> Literal:
        tok = self.tok
        if tok.kind in ("num", "str"):
            self.take()
            return tok.value  # type: ignore[no-any-return]
        if tok.kind == "kw" and tok.text.lower() in ("true", "false"):
            self.take()
            return tok.text.lower() == "true"
        raise self.fail(f"expected {what}")

    def values(self) -> tuple[Literal, ...]:
        if not (self.tok.kind == "punct" and self.tok.text == "["):
            raise self.fail("expected '[' after 'in'")
        self.take()
        out: list[Literal] = []
        while not (self.tok.kind == "punct" and self.tok.text == "]"):
            out.append(self.literal("a value or ']'"))
            if self.tok.kind == "punct" and self.tok.text == ",":
                self.take()
            elif not (self.tok.kind == "punct" and self.tok.text == "]"):
                raise self.fail("expected ',' or ']'")
        self.take()
        return tuple(out)


def _flat(kind: type[And] | type[Or], items: list[Node]) -> tuple[Node, ...]:
    """``a and (b and c)`` is ``a and b and c``: one canonical text for both."""
    out: list[Node] = []
    for item in items:
        out.extend(item.operands if isinstance(item, kind) else (item,))
    return tuple(out)


@functools.lru_cache(maxsize=1024)
def parse(text: str) -> Node:
    """The tree of a selector, or :class:`SelectorError` pointing at the bad token."""
    if len(text) > MAX_SELECTOR:
        raise _error(text, MAX_SELECTOR, f"longer than {MAX_SELECTOR} characters")
    return _Parser(text).parse()


def canonical(text: str) -> str:
    """The selector's canonical text (raises :class:`SelectorError` when invalid)."""
    return str(parse(text))


# ---------------------------------------------------------------------------
# Evaluation


@dataclass(frozen=True)
class Facts:
    """What a node says about itself: the world a selector is evaluated in."""

    node: str = ""
    labels: Mapping[str, str] = field(default_factory=dict)
    data: Mapping[str, Any] = field(default_factory=dict)
    resources: Mapping[str, float] = field(default_factory=dict)


_MISSING = object()


def _walk(source: Any, parts: tuple[str, ...]) -> Any:
    for part in parts:
        if not isinstance(source, Mapping) or part not in source:
            return _MISSING
        source = source[part]
    return source


def _lookup(name: Name, facts: Facts) -> Any:
    head, rest = name.parts[0], name.parts[1:]
    if rest:
        if head == "labels":
            return facts.labels.get(".".join(rest), _MISSING)
        if head == "data":
            return _walk(facts.data, rest)
        if head == "resources":
            return facts.resources.get(".".join(rest), _MISSING)
    flat = str(name)
    if flat in facts.labels:
        return facts.labels[flat]
    found = _walk(facts.data, name.parts)
    if found is not _MISSING:
        return found
    if flat in facts.resources:
        return facts.resources[flat]
    if flat == "node":
        return facts.node
    return _MISSING


_ORDER = {
    "<": lambda a, b: a < b,
    "<=": lambda a, b: a <= b,
    ">": lambda a, b: a > b,
    ">=": lambda a, b: a >= b,
}


def _coerce(fact: Any, literal: Literal) -> Any:
    """``fact`` as the literal's type, or _MISSING when it does not convert."""
    if isinstance(literal, bool):
        if isinstance(fact, bool):
            return fact
        if isinstance(fact, str) and fact.lower() in ("true", "false"):
            return fact.lower() == "true"
        return _MISSING
    if isinstance(literal, (int, float)):
        if isinstance(fact, bool):
            return _MISSING
        if isinstance(fact, (int, float)):
            return fact
        if isinstance(fact, str):
            try:
                number = float(fact)
            except ValueError:
                return _MISSING
            return number if math.isfinite(number) else _MISSING
        return _MISSING
    return fact if isinstance(fact, str) else _MISSING


def _compare(fact: Any, op: str, literal: Literal) -> bool:
    value = _coerce(fact, literal)
    if value is _MISSING:
        return False
    if op == "==":
        return bool(value == literal)
    if op == "!=":
        return bool(value != literal)
    if isinstance(literal, bool):
        return False  # true and false have no order
    return bool(_ORDER[op](value, literal))


def evaluate(node: Node, facts: Facts) -> bool:
    """Whether a node with ``facts`` satisfies the selector (never raises)."""
    if isinstance(node, Or):
        return any(evaluate(o, facts) for o in node.operands)
    if isinstance(node, And):
        return all(evaluate(o, facts) for o in node.operands)
    if isinstance(node, Not):
        return not evaluate(node.operand, facts)
    fact = _lookup(node.name, facts)
    if fact is _MISSING:
        return False
    if isinstance(node, Truthy):
        if isinstance(fact, str):
            return fact.lower() not in ("", "0", "false", "no")
        return bool(fact)
    if isinstance(node, Compare):
        return _compare(fact, node.op, node.value)
    hit = any(_compare(fact, "==", v) for v in node.values)
    return hit != node.negated


def matches(text: str, facts: Facts) -> bool:
    """Parse (cached) and evaluate: for callers holding selector text."""
    return evaluate(parse(text), facts)


# ---------------------------------------------------------------------------
# Resources and the placement key

Resources = dict[str, float]


def check_resources(resources: Mapping[str, Any]) -> Resources:
    """Known names and positive finite amounts, or ValueError naming the field."""
    out: Resources = {}
    for name, amount in resources.items():
        if name not in RESOURCE_NAMES:
            raise ValueError(
                f"resources: unknown resource {name!r} (known: {', '.join(RESOURCE_NAMES)})"
            )
        if isinstance(amount, bool) or not isinstance(amount, (int, float)):
            raise ValueError(f"resources.{name} must be a number, got {amount!r}")
        if not math.isfinite(amount) or amount <= 0:
            raise ValueError(f"resources.{name} must be positive, got {amount!r}")
        out[name] = int(amount) if float(amount).is_integer() else float(amount)
    return out


# Separates the parts of a placement key. A labels-only key stays "k=v,k=v"
# (what stores written before selectors hold); a key with a selector or
# resources appends both parts after this character, which neither a
# canonical selector (JSON-escaped) nor a resources part can contain.
SEP = "\x1e"


def constraint_key(
    labels: Mapping[str, str],
    select: str | None = None,
    resources: Mapping[str, float] | None = None,
) -> str:
    """The canonical placement key of a task ('' for none)."""
    base = ",".join(f"{k}={labels[k]}" for k in sorted(labels))
    if not select and not resources:
        return base
    sel = canonical(select) if select else ""
    need = resources or {}
    res = ",".join(f"{k}={_num(need[k])}" for k in sorted(need))
    return f"{base}{SEP}{sel}{SEP}{res}"


def _num(value: float) -> str:
    return str(int(value)) if float(value).is_integer() else repr(float(value))


@dataclass(frozen=True)
class Constraint:
    """A placement key taken apart: what a node must be, and what it must have free."""

    labels: dict[str, str]
    select: Node | None
    resources: Resources

    def admits(self, facts: Facts) -> bool:
        """Whether the node could ever run it (labels, selector, total resources)."""
        for key, value in self.labels.items():
            if facts.labels.get(key) != value:
                return False
        if self.select is not None and not evaluate(self.select, facts):
            return False
        return self.fits(facts.resources, 1) >= 1

    def fits(self, free: Mapping[str, float], limit: int) -> int:
        """How many copies (up to ``limit``) fit in ``free``; a missing resource is 0."""
        count = limit
        for name, need in self.resources.items():
            count = min(count, int(free.get(name, 0) / need + 1e-9))
        return max(count, 0)


@functools.lru_cache(maxsize=4096)
def parse_key(key: str) -> Constraint:
    """The inverse of :func:`constraint_key` (cached: the coordinator asks often)."""
    base, sel, res = key, "", ""
    if SEP in key:
        base, sel, res = ([*key.rsplit(SEP, 2), "", ""])[:3]
    labels: dict[str, str] = {}
    if base:
        for pair in base.split(","):
            k, _, v = pair.partition("=")
            labels[k] = v
    resources: Resources = {}
    if res:
        for pair in res.split(","):
            k, _, v = pair.partition("=")
            resources[k] = float(v)
    return Constraint(labels, parse(sel) if sel else None, resources)
