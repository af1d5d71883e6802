"""Errors a user can cause and fix (bad input); the CLI prints them as one line, no traceback."""


class UserError(ValueError):
    """Bad input: the message says what is wrong and what would be right."""
