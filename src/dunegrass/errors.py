"""Errors that name the problem and the fix."""


class DunegrassError(ValueError):
    """Bad input or state. The message says what is wrong and what to do about it."""


class ConfigMismatchError(DunegrassError):
    """A cache on disk was made with a different configuration."""


class CorruptCacheError(DunegrassError):
    """A file in a cache is missing, truncated or does not match its checksum."""


class NonFiniteError(DunegrassError):
    """A loss, gradient or feature is NaN or infinite."""
