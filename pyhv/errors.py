"""The root of every error pyhv reports to a user.

Each subpackage has its own subclass; front ends catch ``PyhvError`` and print
its message as one line (the message names the file, option or element at
fault), never a traceback.
"""


class PyhvError(Exception):
    """An error with a one-line, user-facing message."""

    #: process exit status used by the command-line front ends
    exit_status = 2
