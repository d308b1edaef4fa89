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
    """The stacklevel of the user's line: the caller of the outermost frame of this package (a warning raised in
    a hook, under torch's and the model's own frames, still points at the user's ``fit`` or ``score``)."""
    here = os.path.dirname(os.path.abspath(__file__))
    frame, level, outermost, inside = sys._getframe(1), 1, 1, True
    while frame is not None:
        name = frame.f_code.co_filename
        # ours, or contextlib's running a context manager of ours (it calls the generator's code)
        inside = os.path.abspath(name).startswith(here) or (inside and name == contextlib.__file__)
        if inside:
            outermost = level
        frame, level = frame.f_back, level + 1
    return outermost + 1
