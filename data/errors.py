"""The one exception type of the data layer: something is wrong with the user's data or paths."""


class DataError(Exception):
    """Bad input data: a missing file, a malformed IDX/manifest, an undecodable image in strict mode.

    The message always names the offending file (and line or sample where known).
    """
