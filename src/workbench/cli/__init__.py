"""The ``workbench`` command: a thin layer over the project's functions, one module per command.

Each module of this package defines ``add_parser(sub)`` (its flags, with a description, what it
writes, its exit codes and an example in ``--help``) and the handler its parser calls. They are
light to import: a handler imports the heavy stack (transformers, TRL, llama.cpp) when it runs.
"""
from __future__ import annotations

import argparse
import importlib
import shlex
import sys

from workbench.errors import UserError

#: The commands, in the order `workbench --help` lists them (the pipeline's in pipeline order).
COMMANDS = ("train", "merge", "export", "eval", "run", "report", "qualify", "kernels", "parity", "bench", "regress",
            "reports")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="workbench", description="Parity Workbench: verified Triton kernels and a fine-tune -> merge -> GGUF "
        "export -> eval -> report -> qualify pipeline. `workbench COMMAND --help` says what each command writes, "
        "its exit codes and an example.")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")
    for name in COMMANDS:
        importlib.import_module(f"workbench.cli.{name}").add_parser(sub)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    args.command_line = shlex.join(["workbench", *(sys.argv[1:] if argv is None else argv)])
    if not getattr(args, "func", None):
        parser.print_help()
        return 2
    return run_guarded(lambda: args.func(args))


def run_guarded(func) -> int:
    """``func()``'s exit code, with the project's answers to what goes wrong: a UserError is one
    sentence on stderr and exit 2; Ctrl-C says the state is consistent and exits 130; an
    OSError (full disk, refused write) is one sentence naming the file and exit 2."""
    try:
        return func()
    except UserError as err:
        print(f"workbench: error: {err}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        # The state left is consistent (every artifact is written under a temp name and
        # renamed; the interrupted stage is recorded as such): say so, exit 130 (128 + SIGINT).
        print("workbench: interrupted; nothing that looks finished was left half-written, and running the same "
              "command again resumes.", file=sys.stderr)
        return 130
    except OSError as err:
        # The file system refused (full disk, read-only or vanished folder, permissions): one
        # sentence naming the file, never a traceback from deep inside a library.
        print(f"workbench: error: {os_error_sentence(err)}", file=sys.stderr)
        return 2


def os_error_sentence(err: OSError) -> str:
    """One sentence for an OSError: what the system said, the file, what to do."""
    import errno

    where = f" ({err.filename})" if getattr(err, "filename", None) else ""
    if err.errno in (errno.ENOSPC, errno.EDQUOT):
        return (f"no space left on the device{where}; free some space and run the same command again (what was "
                "being written was not kept).")
    if err.errno in (errno.EROFS, errno.EACCES, errno.EPERM):
        return f"the file system refused a write{where}: {err.strerror}; make the folder writable or use another one."
    reason = err.strerror or str(err) or type(err).__name__
    return f"{reason}{where}; check the path, its permissions and free space, then run the same command again."
