"""The one exception type that means "the user gave us bad input".

The CLI turns a UserError into a single line on stderr and a non-zero exit; anything else is a bug and keeps its
traceback. Exercised by `pytest tests/test_cli_errors.py`.
"""


class UserError(Exception):
    """Bad input (missing data, unknown preset, corrupt checkpoint, ...): message is shown as one line."""
