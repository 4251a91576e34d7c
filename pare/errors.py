"""The one exception type that the CLI turns into a one-line message and exit code 2."""


class PareError(Exception):
    """Bad input from the user: wrong path, partial checkpoint, impossible shape. Carries a one-line message."""


def script_exit(body) -> int:
    """A script's exit code: `body()`'s (0 when it returns None), or 2 after printing a PareError as one line, as
    the CLI does."""
    import sys

    try:
        return body() or 0
    except PareError as e:
        print(f"error: {e}", file=sys.stderr)
        return 2


def require(condition: bool, message: str) -> None:
    """Raise `PareError(message)` unless `condition` holds."""
    if not condition:
        raise PareError(message)


EXTRAS_HINT = "pip install 'pare[eval]' (or your own opencv-python / matplotlib)"


class _Missing:
    """Stands in for an optional module that is not installed: the first use raises a one-line PareError."""

    def __init__(self, module: str):
        self._module = module

    def __getattr__(self, name: str):
        raise PareError(f"this needs {self._module}, which is not installed: {EXTRAS_HINT}")


def optional_module(name: str):
    """`import name`, or a stand-in that says how to install it when used. Evaluation (OpenCV) and plots
    (matplotlib) are extras, so the core install stays lean and a user's own OpenCV build is not replaced."""
    import importlib

    try:
        return importlib.import_module(name)
    except ImportError:
        return _Missing(name)


def require_extras(what: str, *modules: str, hint: str = EXTRAS_HINT) -> None:
    """Fail now, with one line, when `what` (a command that reaches its evaluation or plots only after long work)
    will need optional modules that are not installed; `hint` says how to install them."""
    import importlib.util

    missing = [m for m in modules if importlib.util.find_spec(m) is None]
    require(not missing, f"{what} needs {' and '.join(missing)}, which {'is' if len(missing) == 1 else 'are'} not "
            f"installed: {hint}")  # fmt: skip
