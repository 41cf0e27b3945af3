"""The one exception type a user can cause."""


class RegtokError(Exception):
    """An error caused by the user's input (bad path, bad config, incompatible stores).

    The CLI prints it as a single line and exits with status 2; library callers can catch it.
    """
