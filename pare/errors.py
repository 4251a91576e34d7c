"""The one exception type that the CLI turns into a one-line message and exit code 2."""


class PareError(Exception):
    """Bad input from the user: wrong path, partial checkpoint, impossible shape. Carries a one-line message."""


def require(condition: bool, message: str) -> None:
    """Raise `PareError(message)` unless `condition` holds."""
    if not condition:
        raise PareError(message)
