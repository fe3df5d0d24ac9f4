"""Errors a user can fix (bad config, data or launch); the CLI prints them as one line, no traceback."""


class UserError(ValueError):
    """Bad input: the message names the key, file or setting, and what is wrong with it."""
