"""Errors a user can fix: the CLI prints them as one line and exits with status 2."""


class UserError(ValueError):
    """Bad input that the user can correct: a missing path, a bad flag value, a mismatched checkpoint."""
