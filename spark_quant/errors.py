"""Errors a user can act on: one line, naming the file or field and what to do."""


class UserError(Exception):
    """A problem with the user's input or environment; printed as one line, no traceback."""

    exit_code = 2


class StageFailed(UserError):
    """A stage ran but its result failed a check (e.g. an eval threshold)."""

    exit_code = 3


class Inconclusive(StageFailed):
    """A stage ran but a gate's confidence interval holds its threshold: more outputs are needed to decide."""

    exit_code = 4


def run_main(main, argv: list[str] | None = None) -> None:
    """A ``python -m`` tool's entry: its exit code, and a UserError as one line on stderr (no traceback)."""
    import sys

    try:
        code = main(argv)
    except UserError as e:
        print(f"error: {e}", file=sys.stderr)
        raise SystemExit(e.exit_code) from None
    raise SystemExit(code)
