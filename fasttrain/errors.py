"""User-facing errors: a message that names the problem and the fix, printed without a traceback."""


class FasttrainError(Exception):
    """Bad input or a broken environment the user can fix. Entry points print it and exit with status 2."""


class ConfigError(FasttrainError):
    """An unknown key, a wrong type or an impossible value in the run configuration."""


class DatasetError(FasttrainError):
    """A missing, corrupt or mismatching dataset."""
