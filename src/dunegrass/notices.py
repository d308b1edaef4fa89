"""Messages said once per process: a default adapted to the model, an implementation switched for a call."""

from __future__ import annotations

import contextlib
import os
import sys
import warnings


class DunegrassWarning(UserWarning):
    """dunegrass changed a setting for you (and says what and why); filter it like any warning."""


_said: set[str] = set()


def notice_once(key: str, message: str) -> None:
    """Warn with ``message`` the first time ``key`` is seen in this process, pointing at the caller's line."""
    if key in _said:
        return
    _said.add(key)
    warnings.warn(message, DunegrassWarning, stacklevel=user_stacklevel())


def user_stacklevel() -> int:
    """The stacklevel of the first frame outside this package (the user's line)."""
    here = os.path.dirname(os.path.abspath(__file__))
    frame, level = sys._getframe(1), 1
    while frame is not None and (
        os.path.abspath(frame.f_code.co_filename).startswith(here) or frame.f_code.co_filename == contextlib.__file__
    ):  # a context manager of ours warns from contextlib's frames
        frame, level = frame.f_back, level + 1
    return level
