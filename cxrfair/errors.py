"""The one exception type that means "the user can fix this"."""


class CxrfairError(Exception):
    """Bad input or environment: a file, column, option or missing weight the user can fix.

    The CLI prints the message as a single ``Error: ...`` line and exits with status 1, without a
    traceback. Messages name the offending file/column/option and say how to fix it. Anything
    else that escapes is a bug in cxrfair and keeps its traceback.
    """


class CxrfairWarning(UserWarning):
    """Something the user should know before trusting the output, though the command can go on
    (a group with no images in a split, a chunk of work redone). Raised with ``warnings.warn``
    where the fact is known; the CLI prints it as one ``Warning: ...`` line on stderr.
    """
