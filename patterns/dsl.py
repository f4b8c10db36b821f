"""The pattern language: text -> :class:`Pattern`.

Grammar (``#`` starts a comment to the end of the line; whitespace is free)::

    pattern   := or
    or        := and ("|" and)*
    and       := not ("&" not)*
    not       := "~" not | atom
    atom      := "(" pattern ")" | NAME [ "(" [arg ("," arg)*] ")" ]
    arg       := [NAME "="] (INT | pattern)          # patterns only inside heads(...)

``heads(p0, p1, ...)`` makes a per-head pattern (query head ``h`` uses ``p_{h % n}``).
``predicate(<condition> [, heads=n])`` is a custom predicate over ``q, k, h``::

    condition := cond_or; cond_or := cond_and ("|" cond_and)*; cond_and := cond_not ("&" ...)*
    cond_not  := "~" cond_not | sum [("<"|"<="|">"|">="|"=="|"!=") sum]
    sum       := product (("+"|"-") product)*; product := unary (("*"|"//"|"%") unary)*
    unary     := "-" unary | INT | q | k | h | true | false | "(" condition ")"
               | min(sum, ...) | max(sum, ...) | abs(sum) | is_power(sum, INT)

Every problem raises :class:`PatternError` with the text and the column of the culprit.
"""

from __future__ import annotations

import re
from dataclasses import MISSING, dataclass, fields

import sympy

from .errors import PatternError, did_you_mean
from .nodes import Heads, Pattern
from .predicate import Predicate
from .primitives import PRIMITIVES
from .symbolic import Condition, H, IsPowerOf, K, Q, Term, maximum, minimum

_TOKEN = re.compile(
    r"\s+|#[^\n]*|(?P<num>\d+(?:\.\d*)?(?:[eE][+-]?\d+)?)|(?P<name>[A-Za-z_][A-Za-z_0-9]*)"
    r"|(?P<op>//|<=|>=|==|!=|[()&|~,=+\-*%<>])"
)
_SPECIAL = ("heads", "predicate")
_NAMES = tuple(PRIMITIVES) + _SPECIAL


@dataclass(frozen=True)
class Token:
    kind: str  # "num", "name", "op", "end"
    text: str
    column: int


def tokenize(text: str) -> list[Token]:
    """Split ``text`` into tokens (comments and whitespace dropped), ending with an "end" token."""
    out: list[Token] = []
    pos = 0
    while pos < len(text):
        m = _TOKEN.match(text, pos)
        if m is None:
            raise PatternError(f"unexpected character {text[pos]!r}", text, pos)
        if m.lastgroup is not None:
            out.append(Token(m.lastgroup, m.group(), pos))
        pos = m.end()
    out.append(Token("end", "", len(text.rstrip())))
    return out


def parse(text: str) -> Pattern:
    """Parse pattern DSL text (see the module docstring for the grammar).

    >>> str(parse("causal & sliding(w=1024)  # Mistral"))
    'causal & sliding(1024)'
    """
    if not isinstance(text, str):
        raise PatternError(f"pattern text must be a string, got {type(text).__name__}")
    parser = _Parser(text)
    if parser.peek().kind == "end":
        raise PatternError("empty pattern", text, 0)
    try:
        result = parser.pattern()
    except RecursionError:
        tok = parser.tokens[min(parser.pos, len(parser.tokens) - 1)]
        raise PatternError("pattern nested too deeply", text, tok.column) from None
    tok = parser.peek()
    if tok.kind != "end":
        problem = (
            "unmatched ')'" if tok.text == ")" else f"unexpected {tok.text!r} after the pattern"
        )
        raise PatternError(problem, text, tok.column)
    return result


class _Parser:
    def __init__(self, text: str):
        self.text = text
        self.tokens = tokenize(text)
        self.pos = 0

    # -- token helpers -----------------------------------------------------------------------
    def peek(self) -> Token:
        return self.tokens[self.pos]

    def take(self) -> Token:
        tok = self.tokens[self.pos]
        self.pos += 1
        return tok

    def accept(self, op: str) -> Token | None:
        tok = self.peek()
        if tok.kind == "op" and tok.text == op:
            self.pos += 1
            return tok
        return None

    def error(self, problem: str, tok: Token) -> PatternError:
        return PatternError(problem, self.text, tok.column)

    def describe(self, tok: Token) -> str:
        return "the end of the text" if tok.kind == "end" else repr(tok.text)

    def close(self, opening: Token) -> None:
        if self.accept(")") is None:
            tok = self.peek()
            if tok.kind == "end":
                raise self.error("unbalanced parentheses: '(' is never closed", opening)
            raise self.error(f"expected ')' or ',' but found {self.describe(tok)}", tok)

    # -- patterns ----------------------------------------------------------------------------
    def pattern(self) -> Pattern:
        left = self.conjunction()
        while self.accept("|"):
            left = left | self.conjunction()
        return left

    def conjunction(self) -> Pattern:
        left = self.negation()
        while self.accept("&"):
            left = left & self.negation()
        return left

    def negation(self) -> Pattern:
        if self.accept("~"):
            return ~self.negation()
        return self.atom()

    def atom(self) -> Pattern:
        tok = self.take()
        if tok.kind == "op" and tok.text == "(":
            inner = self.pattern()
            self.close(tok)
            return inner
        if tok.kind != "name":
            if tok.kind == "end":
                raise self.error("expected a pattern but the text ended", tok)
            if tok.text == ")":
                raise self.error("expected a pattern before ')'", tok)
            raise self.error(f"expected a pattern, found {tok.text!r}", tok)
        if tok.text == "heads":
            return self.heads(tok)
        if tok.text == "predicate":
            return self.predicate(tok)
        cls = PRIMITIVES.get(tok.text)
        if cls is None:
            raise self.error(
                f"unknown primitive {tok.text!r}{did_you_mean(tok.text, _NAMES)}", tok
            )
        return self.primitive(tok, cls)

    def primitive(self, name: Token, cls) -> Pattern:
        params = [f.name for f in fields(cls)]
        values: dict[str, int] = {}
        columns: dict[str, Token] = {}
        opening = self.accept("(")
        if opening is not None and not self.accept(")"):
            while True:
                key, value_tok = self.argument(name, params, len(values))
                if key in values:
                    raise self.error(f"{name.text}: parameter {key!r} given twice", value_tok)
                values[key], columns[key] = self.integer(name.text, key, value_tok), value_tok
                if self.accept(")"):
                    break
                if self.accept(",") is None:
                    self.close(opening)
        required = [f.name for f in fields(cls) if f.default is MISSING]
        missing = [p for p in params if p not in values and p in required]
        if missing:
            expected = ", ".join(params) if params else ""
            raise self.error(
                f"{name.text} needs parameter {missing[0]!r} ({name.text}({expected}))", name
            )
        try:
            return cls(**values)
        except PatternError as e:
            bad = next((p for p in params if f"'{p}'" in e.problem), None)
            raise self.error(e.problem, columns.get(bad, name)) from None

    def argument(self, name: Token, params: list[str], index: int) -> tuple[str, Token]:
        """One ``[NAME =] value`` argument; returns the parameter name and the value's token."""
        tok = self.peek()
        if tok.kind == "end" or tok.text in (",", ")"):
            raise self.error(f"{name.text}: expected an argument, found {self.describe(tok)}", tok)
        nxt = self.tokens[self.pos + 1]
        if tok.kind == "name" and nxt.kind == "op" and nxt.text == "=":
            self.pos += 2
            if tok.text not in params:
                hint = did_you_mean(tok.text, params)
                raise self.error(f"{name.text} has no parameter {tok.text!r}{hint}", tok)
            return tok.text, self.peek()
        if index >= len(params):
            if not params:
                raise self.error(f"{name.text} takes no arguments", tok)
            raise self.error(
                f"{name.text} takes at most {len(params)} argument"
                f"{'s' if len(params) > 1 else ''} ({', '.join(params)})",
                tok,
            )
        return params[index], tok

    def integer(self, prim: str, param: str, start: Token) -> int:
        sign = -1 if self.accept("-") else 1
        tok = self.take()
        if tok.kind == "num" and tok.text.isdigit():
            value = sign * int(tok.text)
            return value
        what = "nothing" if tok.kind == "end" else repr(tok.text)
        raise self.error(f"{prim}: parameter {param!r} must be an integer, got {what}", start)

    def heads(self, name: Token) -> Pattern:
        opening = self.accept("(")
        if opening is None:
            raise self.error("heads needs a list of patterns: heads(p0, p1, ...)", name)
        if self.accept(")"):
            raise self.error("heads needs at least one pattern", name)
        parts = [self.pattern()]
        while self.accept(","):
            parts.append(self.pattern())
        self.close(opening)
        return Heads(tuple(parts))

    def predicate(self, name: Token) -> Pattern:
        opening = self.accept("(")
        if opening is None:
            raise self.error("predicate needs a condition: predicate(q - k < 8)", name)
        start = self.peek()
        cond = _Condition(self).condition()
        if not isinstance(cond, Condition):
            raise self.error("predicate needs a condition (a comparison), not a number", start)
        heads, value = None, None
        if self.accept(","):
            key = self.take()
            if not (key.text == "heads" and self.accept("=")):
                raise self.error("predicate takes one condition and optionally heads=n", key)
            value = self.peek()
            heads = self.integer("predicate", "heads", value)
        self.close(opening)
        try:
            return Predicate(cond.expr, heads)
        except PatternError as e:
            # A bad heads= value is marked there; a condition problem at the condition.
            at = value if value is not None and "heads must" in e.problem else start
            raise self.error(e.problem, at) from None


class _Condition:
    """Parser of the condition inside ``predicate(...)``; builds Term/Condition values."""

    _ATOMS = {"q": Q, "k": K, "h": H}
    _FUNCS = ("min", "max", "abs", "is_power")

    def __init__(self, parser: _Parser):
        self.p = parser

    def expect(self, value, kind, tok: Token):
        if not isinstance(value, kind):
            want = "a condition" if kind is Condition else "a number"
            raise self.p.error(f"expected {want} here", tok)
        return value

    def condition(self):
        start = self.p.peek()
        left = self.conjunction()
        while self.p.accept("|") is not None:
            self.expect(left, Condition, start)
            right_tok = self.p.peek()
            left = left | self.expect(self.conjunction(), Condition, right_tok)
        return left

    def conjunction(self):
        start = self.p.peek()
        left = self.negation()
        while self.p.accept("&") is not None:
            self.expect(left, Condition, start)
            right_tok = self.p.peek()
            left = left & self.expect(self.negation(), Condition, right_tok)
        return left

    def negation(self):
        if self.p.accept("~") is not None:
            tok = self.p.peek()
            return ~self.expect(self.negation(), Condition, tok)
        return self.relation()

    def relation(self):
        start = self.p.peek()
        left = self.sum()
        tok = self.p.peek()
        if tok.kind == "op" and tok.text in ("<", "<=", ">", ">=", "==", "!="):
            self.p.take()
            self.expect(left, Term, start)
            right_tok = self.p.peek()
            right = self.expect(self.sum(), Term, right_tok)
            return {
                "<": left.__lt__, "<=": left.__le__, ">": left.__gt__, ">=": left.__ge__,
                "==": left.__eq__, "!=": left.__ne__,
            }[tok.text](right)
        return left

    def sum(self):
        start = self.p.peek()
        left = self.product()
        while (tok := self.p.peek()).kind == "op" and tok.text in "+-":
            self.p.take()
            self.expect(left, Term, start)
            right_tok = self.p.peek()
            right = self.expect(self.product(), Term, right_tok)
            left = left + right if tok.text == "+" else left - right
        return left

    def product(self):
        start = self.p.peek()
        left = self.unary()
        while (tok := self.p.peek()).kind == "op" and tok.text in ("*", "//", "%"):
            self.p.take()
            self.expect(left, Term, start)
            right_tok = self.p.peek()
            right = self.expect(self.unary(), Term, right_tok)
            if tok.text == "*":
                left = left * right
            elif right.expr == 0:
                raise self.p.error("division by zero", right_tok)
            else:
                left = left // right if tok.text == "//" else left % right
        return left

    def unary(self):
        tok = self.p.take()
        if tok.kind == "op" and tok.text == "-":
            return -self.expect(self.unary(), Term, self.p.peek())
        if tok.kind == "num":
            if not tok.text.isdigit():
                raise self.p.error(f"expected an integer, got {tok.text!r}", tok)
            return Term(int(tok.text))
        if tok.kind == "op" and tok.text == "(":
            inner = self.condition()
            self.p.close(tok)
            return inner
        if tok.kind == "name":
            if tok.text in self._ATOMS:
                return Term(self._ATOMS[tok.text])
            if tok.text in ("true", "false"):
                return Condition(sympy.true if tok.text == "true" else sympy.false)
            if tok.text in self._FUNCS:
                return self.call(tok)
            choices = tuple(self._ATOMS) + self._FUNCS + ("true", "false")
            raise self.p.error(
                f"unknown name {tok.text!r} in predicate{did_you_mean(tok.text, choices)}", tok
            )
        raise self.p.error(f"expected a number or q, k, h, found {self.p.describe(tok)}", tok)

    def call(self, name: Token):
        opening = self.p.accept("(")
        if opening is None:
            raise self.p.error(f"{name.text} needs arguments: {name.text}(...)", name)
        args = []
        while True:
            tok = self.p.peek()
            args.append((self.expect(self.sum(), Term, tok), tok))
            if self.p.accept(",") is None:
                break
        self.p.close(opening)
        values = [a for a, _ in args]
        if name.text in ("min", "max"):
            if len(values) < 2:
                raise self.p.error(f"{name.text} needs at least two arguments", name)
            return minimum(*values) if name.text == "min" else maximum(*values)
        if name.text == "abs":
            if len(values) != 1:
                raise self.p.error("abs takes one argument", name)
            return abs(values[0])
        if len(values) != 2 or not (values[1].expr.is_Integer and values[1].expr >= 2):
            raise self.p.error("is_power takes a number and an integer base >= 2", name)
        return Condition(IsPowerOf(values[0].expr, values[1].expr))
