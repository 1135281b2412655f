"""After stage 5: `ctrpipe report` turns run directories into one static HTML page with PNG figures.

rundata.py reads a run directory, stats.py bins predictions, figures.py draws (matplotlib, Agg),
leaderboard.py ranks runs on a shared split, page.py writes the HTML and build.py puts it on disk atomically.
"""

from __future__ import annotations
