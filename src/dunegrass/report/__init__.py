"""HTML reports: one self-contained page (embedded PNGs, inline CSS, no script) per demo or run.

``write_report`` (``dunegrass demo``): LDS against seconds, the subsets behind LDS for one query, what the
scores mean, and every method's proponents and opponents of a few test digits. ``write_run_report``
(``dunegrass score``): the same without the LDS part, with texts shown as text.
"""

from .demo_report import write_report
from .notes import SCALE_NOTE, SIGN_NOTE
from .run_report import write_run_report

__all__ = ["SCALE_NOTE", "SIGN_NOTE", "write_report", "write_run_report"]
