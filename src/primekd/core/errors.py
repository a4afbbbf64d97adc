"""The one exception type the CLI turns into a one-line message and a non-zero exit."""

import difflib
from collections.abc import Iterable


class PrimekdError(Exception):
    """A problem with the user's input or environment, explained in one line."""


def did_you_mean(word: str, choices: Iterable[str]) -> str:
    """` (did you mean 'x'?)` for the closest of `choices` to a misspelt `word`, else ''."""
    close = difflib.get_close_matches(word, list(choices), n=1)
    return f" (did you mean {close[0]!r}?)" if close else ""
