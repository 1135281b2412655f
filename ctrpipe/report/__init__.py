"""After stage 5: `ctrpipe report` turns run directories into one static HTML page with PNG figures.

rundata.py reads a run directory, stats.py bins predictions, figures.py draws (matplotlib, Agg),
leaderboard.py ranks runs on a shared split, page.py writes the HTML and build.py puts it on disk atomically.
"""

from __future__ import annotations

import os

from ctrpipe.errors import ReportError


def _import_matplotlib() -> None:
    """matplotlib checks MPLBACKEND when it is imported, and a value it does not know ended the report in a
    traceback; the report draws to PNG files only, so any backend matplotlib knows will do."""
    try:
        import matplotlib  # noqa: F401
    except ValueError as exc:
        if "backend" not in str(exc):
            raise
        raise ReportError(f"matplotlib refuses MPLBACKEND={os.environ.get('MPLBACKEND')!r} (not a backend it "
                          "knows)", where="MPLBACKEND (environment)",
                          fix="unset MPLBACKEND, or set it to a backend matplotlib knows, e.g. MPLBACKEND=Agg "
                              "(the report draws to files only)") from None


_import_matplotlib()
