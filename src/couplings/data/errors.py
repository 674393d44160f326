"""`DatasetError`, the one error of the data layer: every module of `couplings.data` raises it."""


class DatasetError(RuntimeError):
    """A dataset file is missing, malformed, corrupt, or could not be fetched."""
