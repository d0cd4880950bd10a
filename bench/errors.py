"""The one exception type for a user's mistake.

The CLI turns a UserError into one line on stderr and exit code 2. Anything
else that escapes is a bug and keeps its traceback.
"""


class UserError(Exception):
    """Bad input: an unknown name, an impossible size, a missing file...

    The message is one line that says what was wrong and what would work.
    """


class RunFailed(Exception):
    """A run that could not finish for a reason outside the user's input (a rank died or hung).

    The CLI prints the message as one line and exits with code 1; what was finished is kept.
    """
