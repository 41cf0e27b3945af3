"""The exception types a user (or the user's machine) can cause."""

import errno

# OSErrors a user's environment causes (a full disk, a read-only or forbidden path): one line, not a traceback.
# A sweep stops on them rather than fail trial after trial, and the trial they stopped runs again on resume.
ENVIRONMENT_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOTDIR,
                      errno.EISDIR)


class RegtokError(Exception):
    """An error caused by the user's input (bad path, bad config, incompatible stores).

    The CLI prints it as a single line and exits with status 2; library callers can catch it.
    """

    exit_code = 2


class Interrupted(RegtokError):
    """The user interrupted a command (Ctrl-C); the message says how to continue. Exit status 130 (128 + SIGINT),
    as a shell reports an interrupted program."""

    exit_code = 130
