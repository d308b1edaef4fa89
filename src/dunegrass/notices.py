"""Messages said once per process: a default adapted to the model, an implementation switched for a call."""

from __future__ import annotations

import warnings


class DunegrassWarning(UserWarning):
    """dunegrass changed a setting for you (and says what and why); filter it like any warning."""


_said: set[str] = set()


def notice_once(key: str, message: str) -> None:
    """Warn with ``message`` the first time ``key`` is seen in this process."""
    if key in _said:
        return
    _said.add(key)
    warnings.warn(message, DunegrassWarning, stacklevel=3)
