"""Exceptions that carry the exit status the contract gives them."""

EXIT_OK = 0
EXIT_FAILURE = 1
EXIT_USAGE = 2


class VifError(Exception):
    """A failure: something on the system did not do what we asked (exit 1)."""

    exit_code = EXIT_FAILURE


class InputError(VifError):
    """Malformed or missing input, refused before any change (exit 2)."""

    exit_code = EXIT_USAGE
