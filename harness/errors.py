"""The user-facing error type: a failure the user can fix, told in one line.

Every error the command line prints as its one-line message (without a type name or a
traceback) derives from ``HarnessError``: bad input, missing data or models, a run directory
that does not match, a sweep that cannot start. The message names the problem and the fix.
"""


class HarnessError(Exception):
    """A user-facing error: one line naming the problem and the fix."""


def one_line(exc: BaseException) -> str:
    """What the command line prints for ``exc``: a ``HarnessError``'s message as it is; a bad
    config override, an interrupt or any other error with what to do about it."""
    text = str(exc).strip().splitlines()[0] if str(exc).strip() else ""
    if isinstance(exc, HarnessError):
        return text
    name = type(exc).__name__
    if "ConfigComposition" in name or "OverrideParse" in name or "ConfigKey" in name or "Validation" in name:
        return f"bad config override: {text} (see `harness run --help` for the valid keys)"
    if isinstance(exc, KeyboardInterrupt):
        return "interrupted; finished records are saved, rerun with the same --out to resume"
    return f"{name}: {text} (rerun with --debug for the traceback)"
