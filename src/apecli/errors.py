"""The one error type for problems a user can fix: bad input, missing files, wrong settings."""


class ApecliError(Exception):
    """A user-facing failure; the command line prints its message as one line and exits 1."""
