"""Errors a user can act on: printed by the CLI as one sentence, exit 2."""
from __future__ import annotations


class UserError(Exception):
    """A problem with what the user asked for or gave us: printed as one sentence
    (what is wrong and what to do instead), exit code 2, never a traceback."""
