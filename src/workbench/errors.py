"""Errors a user can act on: printed by the CLI as one sentence, exit 2."""
from __future__ import annotations


class UserError(Exception):
    """A problem with what the user asked for or gave us: printed as one sentence
    (what is wrong and what to do instead), exit code 2, never a traceback."""


def reason(err: BaseException | str, limit: int = 200) -> str:
    """A library's error message, made fit to sit inside one of our sentences: its first
    line, up to its first sentence break, without the closing period, at most ``limit``
    characters (the exception's type name when it says nothing)."""
    import re

    text = str(err).strip()
    first = text.splitlines()[0] if text else (type(err).__name__ if isinstance(err, BaseException) else "")
    first = re.split(r"(?<=[.!?])\s+(?=[A-Z])", first, maxsplit=1)[0].rstrip(".")
    return first[:limit]
