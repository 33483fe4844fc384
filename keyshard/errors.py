"""The one exception type for user mistakes: the CLI prints it as a single line, no traceback."""


class KeyshardError(Exception):
    """A problem with the user's input (file, option, data) that keyshard reports and exits on.

    The message must name the file or option at fault and must never contain key material.
    """
