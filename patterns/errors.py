"""The one error type for bad pattern text or bad pattern parameters."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class PatternError(ValueError):
    """A pattern could not be built: bad DSL text, a bad parameter, or an unsupported operation.

    Attributes:
        problem: what is wrong, in a sentence.
        text: the DSL text being parsed (None when the pattern was built from Python).
        column: 0-based offset in ``text`` where the problem is (None when unknown); for
            one-line text that is the column.

    ``str(err)`` names the problem, then quotes the text with a caret under the column::

        unknown primitive 'casual' (did you mean 'causal'?) (column 1)
          casual & sliding(64)
          ^

    For text of several lines it names the line, quotes only that line and puts the caret
    in it: ``... (line 2, column 3)``.
    """

    def __init__(self, problem: str, text: str | None = None, column: int | None = None):
        self.problem = problem
        self.text = text
        self.column = column
        super().__init__(self._render())

    @property
    def line(self) -> int | None:
        """1-based line of ``column`` in ``text`` (None when either is unknown)."""
        if self.text is None or self.column is None:
            return None
        return self.text.count("\n", 0, self.column) + 1

    def _render(self) -> str:
        if self.text is None:
            return self.problem
        if "\n" not in self.text.rstrip("\n"):
            quoted = self.text.rstrip("\n")
            # Columns are 1-based in the message (editors count that way), 0-based in .column.
            where = f" (column {self.column + 1})" if self.column is not None else ""
            caret = self.column
        elif self.column is None:
            quoted, where, caret = self.text, "", None
        else:
            start = self.text.rfind("\n", 0, self.column) + 1
            end = self.text.find("\n", self.column)
            quoted = self.text[start:end if end >= 0 else len(self.text)]
            caret = self.column - start
            where = f" (line {self.line}, column {caret + 1})"
        lines = [f"{self.problem}{where}", f"  {quoted}"]
        if caret is not None:
            lines.append("  " + " " * caret + "^")
        return "\n".join(lines)

    def located(self, text: str, column: int) -> PatternError:
        """The same problem, placed at ``column`` of ``text`` (keeps an existing location)."""
        if self.text is not None:
            return self
        return PatternError(self.problem, text, column)


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """`` (did you mean 'x'?)`` for the closest choice, or an empty string."""
    choices = list(choices)
    close = difflib.get_close_matches(word, choices, n=1, cutoff=0.6)
    # Short names (local's 'w') are far from their long spellings ('width') by edit distance.
    close = close or [c for c in choices if word.startswith(c) or c.startswith(word)][:1]
    return f" (did you mean '{close[0]}'?)" if close else ""
