"""User-facing errors.

Anything a user can fix (a wrong name, a missing folder, a bad config key) raises :class:`UserError`;
the CLI prints its message on one line and exits with code 2, without a traceback.
"""


class UserError(Exception):
    """A problem in the user's input, with a message that says what to do about it."""


USER_ERROR_EXIT = 2
