"""The one template language of primekd: Jinja2, for `--prompt` and for priming strategies.

Variables are written `{{ question }}`; a variable that does not exist is an error, not an
empty string (StrictUndefined), and the single-brace `{question}` of str.format is refused
with the spelling to use instead, since Jinja would print it literally and the model would
never see the question.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from functools import cache
from typing import Any

import jinja2
import jinja2.meta

from primekd.core.errors import PrimekdError


def check(source: str, variables: Iterable[str], where: str,
          example: dict[str, str] | None = None) -> set[str]:
    """Refuse a template with single-brace variables, syntax errors, unknown variables, or
    one that fails to render `example`; return the variables it uses."""
    variables = tuple(variables)
    names = "|".join(map(re.escape, variables))
    single = re.search(r"(?<!\{)\{\s*(" + names + r")\s*\}(?!\})", source)
    if single:
        raise PrimekdError(f"{where}: {single.group(0)} is str.format syntax; templates are "
                           f"Jinja, write {{{{ {single.group(1)} }}}} instead")
    try:
        used = jinja2.meta.find_undeclared_variables(_environment().parse(source))
    except jinja2.TemplateSyntaxError as e:
        raise PrimekdError(f"{where}: template error on line {e.lineno}: {e.message}") from None
    unknown = sorted(used - set(variables))
    if unknown:
        raise PrimekdError(f"{where}: unknown variable(s) {', '.join(unknown)}; "
                           f"templates may use {', '.join(variables)}")
    if example is not None:  # runtime errors (bad filter arguments, types) surface now
        render(source, example, where)
    return set(used)


def require(used: set[str], name: str, where: str) -> None:
    """Refuse a template that never shows `name` (the model would not see the question)."""
    if name not in used:
        raise PrimekdError(f"{where}: no {{{{ {name} }}}} placeholder; where does the "
                           f"{name} go?")


def render(source: str, context: dict[str, Any], where: str = "template") -> str:
    try:
        return _template(source).render(**context)
    except jinja2.TemplateError as e:
        raise PrimekdError(f"{where}: template error: {e}") from None


@cache
def _environment() -> jinja2.Environment:
    # StrictUndefined: a misspelt variable is an error, not a silently empty prompt.
    return jinja2.Environment(undefined=jinja2.StrictUndefined, keep_trailing_newline=True)


@cache
def _template(source: str) -> jinja2.Template:
    return _environment().from_string(source)
