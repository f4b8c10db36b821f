"""The DSL: parsing, canonical text round trips, Python builders, and error reporting."""

from __future__ import annotations

import pytest
import sparse_compile.patterns as P
from hypothesis import given, settings
from hypothesis import strategies as st
from pattern_defs import patterns, text_and_pattern


@settings(max_examples=200, deadline=None)
@given(p=patterns(max_leaves=6))
def test_str_parse_round_trip(p):
    text = str(p)
    again = P.parse(text)
    assert again == p and hash(again) == hash(p)
    assert str(again) == text


@settings(max_examples=200, deadline=None)
@given(pair=text_and_pattern())
def test_builders_equal_parsed_text(pair):
    text, built = pair
    parsed = P.parse(text)
    assert parsed == built and hash(parsed) == hash(built)


@pytest.mark.parametrize("text,built", [
    ("causal & sliding(1024)", P.causal & P.sliding(1024)),
    ("causal&sliding(w=1024)", P.causal & P.sliding(1024)),
    ("  causal\n  & sliding( 1024 )  # Mistral\n", P.causal & P.sliding(1024)),
    ("local(w=256)", P.local(256)),
    ("window(after=2, before=1)", P.window(1, 2)),
    ("window(1, after=2)", P.window(1, 2)),
    ("axial(16)", P.axial(16, 0)),
    ("axial(cols=16, offset=1)", P.axial(16, 1)),
    ("fanout", P.fanout(2)),
    ("fanout()", P.fanout()),
    ("fanout(base=3)", P.fanout(3)),
    ("dense", P.dense),
    ("global(4) | causal", P.global_(4) | P.causal),
    ("causal | prefix(64)", P.causal | P.prefix(64)),
    ("~causal", ~P.causal),
    ("~~causal", ~~P.causal),
    ("a_or_b" if False else "causal | sink(4) & local(8)", P.causal | (P.sink(4) & P.local(8))),
    ("(causal | sink(4)) & local(8)", (P.causal | P.sink(4)) & P.local(8)),
    ("causal & sink(1) & local(8)", (P.causal & P.sink(1)) & P.local(8)),
    ("causal & (sink(1) & local(8))", P.causal & (P.sink(1) & P.local(8))),
    ("heads(causal, local(64) & causal)", P.heads(P.causal, P.local(64) & P.causal)),
    ("dma(keep=2048) & causal", P.dma(2048) & P.causal),
    ("topk(8, block=64)", P.topk(8, block=64)),
    ("predicate((q - k) % 64 < 8)", P.predicate(lambda q, k: (q - k) % 64 < 8)),
    ("predicate(min(q, 100) >= k & ~(k == 3))",
     P.predicate(lambda q, k: (P.minimum(q, 100) >= k) & ~(k == 3))),
    ("predicate(k <= h * 4, heads=3)", P.predicate(lambda q, k, h: k <= h * 4, heads=3)),
])
def test_text_equals_builders(text, built):
    assert P.parse(text) == built
    assert P.parse(str(built)) == built


def test_canonical_text():
    assert str(P.parse("causal&sliding(w = 4)")) == "causal & sliding(4)"
    assert str(P.causal | P.sink(4) & P.local(8)) == "causal | sink(4) & local(8)"
    assert str((P.causal | P.sink(4)) & P.local(8)) == "(causal | sink(4)) & local(8)"
    assert str(~(P.causal & P.sink(2))) == "~(causal & sink(2))"
    assert str(P.global_(3)) == "global(3)"
    assert str(P.axial(8)) == "axial(8, 0)"


def test_string_operands_are_parsed():
    assert P.causal & "sliding(8)" == P.causal & P.sliding(8)
    assert "sink(2)" | P.causal == P.sink(2) | P.causal


# (text, message fragment, 0-based caret column)
BAD = [
    ("", "empty pattern", 0),
    ("  # nothing but a comment", "empty pattern", 0),
    ("casual", "did you mean 'causal'", 0),
    ("causal & slidng(64)", "did you mean 'sliding'", 9),
    ("causal & glob(2)", "did you mean 'global'", 9),
    ("local()", "needs parameter 'w'", 0),
    ("window(3)", "needs parameter 'after'", 0),
    ("local(1, 2)", "at most 1 argument", 9),
    ("causal(3)", "takes no arguments", 7),
    ("local(-3)", "must be positive, got -3", 6),
    ("local(0)", "must be positive, got 0", 6),
    ("sink(n=0)", "must be positive, got 0", 7),
    ("axial(4, -1)", "must be at least 0", 9),
    ("fanout(1)", "at least 2", 7),
    ("local(2.5)", "must be an integer", 6),
    ("local(causal)", "must be an integer", 6),
    ("local(w=3, w=4)", "given twice", 13),
    ("local(width=3)", "no parameter 'width' (did you mean 'w'?)", 6),
    ("sliding(4,,)", "expected an argument", 10),
    ("(causal & local(4)", "never closed", 0),
    ("local(3", "never closed", 5),
    ("causal & local(4))", "unmatched ')'", 17),
    ("causal local(4)", "unexpected 'local'", 7),
    ("causal &", "text ended", 8),
    ("& causal", "expected a pattern", 0),
    ("causal $ local(4)", "unexpected character '$'", 7),
    ("heads()", "at least one pattern", 0),
    ("heads(causal, )", "expected a pattern", 14),
    ("predicate(q < )", "expected a number", 14),
    ("predicate(q + k)", "needs a condition", 10),
    ("predicate(x < 3)", "unknown name 'x'", 10),
    ("predicate(q // 0 < 1)", "division by zero", 15),
    ("predicate(h < 2)", "needs heads=n", 10),
    ("predicate((q < 2) + 1 < 3)", "expected a number", 10),
    ("topk(4, block=0)", "must be positive", 14),
    ("dma(keep=0)", "'keep' must be positive, got 0", 9),
    ("topk(0)", "'k' must be positive", 5),
    ("local(w=)", "must be an integer, got ')'", 8),
    ("local(+3)", "must be an integer, got '+'", 6),
    ("sliding(1e3)", "must be an integer, got '1e3'", 8),
    ("local(0x10)", "expected ')' or ','", 7),
    ("window(a=1, b=2)", "no parameter 'a' (did you mean 'after'?)", 7),
    ("heads", "heads needs a list of patterns", 0),
    ("heads(causal, local(4)", "never closed", 5),
    ("predicate", "predicate needs a condition", 0),
    ("predicate(q < k, foo=2)", "optionally heads=n", 17),
    ("predicate(q < k, heads=0)", "heads must be a positive integer, got 0", 23),
    ("predicate(is_power(q - k, 1))", "is_power takes", 10),
    ("predicate(mn(q, k) < 3)", "unknown name 'mn' in predicate (did you mean 'min'?)", 10),
    ("causal(", "expected an argument, found the end of the text", 7),
    ("local(3)(4)", "unexpected '(' after the pattern", 8),
    ("causal ~local(4)", "unexpected '~' after the pattern", 7),
    ("causal \u2227 local(4)", "unexpected character '\u2227'", 7),
    ("()", "expected a pattern before ')'", 1),
]


@pytest.mark.parametrize("text,fragment,column", BAD, ids=[b[0] or "<empty>" for b in BAD])
def test_bad_inputs(text, fragment, column):
    with pytest.raises(P.PatternError) as info:
        P.parse(text)
    err = info.value
    assert fragment in str(err)
    assert err.column == column and err.text == text
    lines = str(err).splitlines()
    assert lines[1] == "  " + text.splitlines()[0] if text else True
    assert lines[-1] == "  " + " " * column + "^"
    assert isinstance(err, ValueError)


# Text of several lines: (text, fragment, 0-based offset, line, the quoted line, caret column)
BAD_MULTILINE = [
    ("causal &\n  slidng(64)", "did you mean 'sliding'", 11, 2, "  slidng(64)", 2),
    ("# Mistral\ncausal & sliding(64\n", "never closed", 26, 2, "causal & sliding(64", 16),
    ("local(3)\n\n)", "unmatched ')'", 10, 3, ")", 0),
    ("heads(causal,\n      local(-2))", "must be positive, got -2", 26, 2, "      local(-2))", 12),
]


@pytest.mark.parametrize("text,fragment,offset,line,quoted,caret", BAD_MULTILINE,
                         ids=[b[0].replace("\n", "/") for b in BAD_MULTILINE])
def test_bad_multiline_inputs_point_into_their_line(text, fragment, offset, line, quoted, caret):
    with pytest.raises(P.PatternError) as info:
        P.parse(text)
    err = info.value
    assert fragment in str(err) and (err.column, err.line, err.text) == (offset, line, text)
    first, shown, marker = str(err).splitlines()
    assert first.endswith(f"(line {line}, column {caret + 1})")
    assert shown == "  " + quoted and marker == "  " + " " * caret + "^"


@pytest.mark.parametrize("text", ["(" * 3000 + "causal" + ")" * 3000, "~" * 3000 + "causal",
                                  "predicate(" + "-" * 3000 + "q < k)"],
                         ids=["parentheses", "negations", "minus signs"])
def test_deep_nesting_is_a_pattern_error(text):
    with pytest.raises(P.PatternError, match="nested too deeply") as info:
        P.parse(text)
    assert info.value.text == text and 0 < info.value.column < len(text)


@settings(max_examples=300, deadline=None)
@given(st.lists(st.sampled_from([
    "causal", "local", "heads", "predicate", "q", "k", "(", ")", ",", "&", "|", "~", "=", "w",
    "3", "0", "-", "//", "%", "<", "==", "min", " ", "#", "x", "2.5", "sink", "window",
]), max_size=12))
def test_parser_never_raises_anything_but_pattern_error(tokens):
    text = "".join(tokens)
    try:
        P.parse(text)
    except P.PatternError:
        pass


def test_builders_validate_like_the_dsl():
    with pytest.raises(P.PatternError, match="must be positive"):
        P.local(0)
    with pytest.raises(P.PatternError, match="must be an integer"):
        P.sliding(2.0)
    with pytest.raises(P.PatternError, match="must be an integer"):
        P.sink(True)
