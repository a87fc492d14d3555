"""Errors that the command line reports as one readable line."""


class InputError(ValueError):
    """Bad input data or a bad option: the message says what and how to fix it.

    Stages print it as a single line and exit non-zero without writing outputs.
    """
