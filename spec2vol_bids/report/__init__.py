"""Quality-control figures and the HTML reports (``sub-<label>.html``, ``group.html``).

The reports are single files that open offline: figures are embedded as ``data:`` URIs (SVG for
line plots, PNG for images), the stylesheet is inline, and there is no script, web font or
remote resource. They read only what the levels left in ``OUTPUT_DIR`` (see
``docs/interfaces.md``), so they can be rebuilt at any time and say plainly which parts have no
data yet; figures of data in a template space (``space-MNI152NLin2009cAsym``) are drawn over the
template's T1w image when TemplateFlow's home holds it, else over what is at hand, as the caption
says (see :func:`anatomical_underlay`).

:mod:`.figures` draws the QC figures during processing, :mod:`.html` builds pages (its stylesheet
is ``style.css``), :mod:`.participant` and :mod:`.group` write the two reports from what
:mod:`.outputs` reads.
"""

from spec2vol_bids.report.figures import (DISPLAY_CHANNELS, anatomical_underlay,
                                          plot_alignment_qc, plot_spectrogram_qc)
from spec2vol_bids.report.group import write_group_report
from spec2vol_bids.report.html import STYLE
from spec2vol_bids.report.outputs import METRICS
from spec2vol_bids.report.participant import write_participant_report

__all__ = [
    "DISPLAY_CHANNELS",
    "METRICS",
    "STYLE",
    "anatomical_underlay",
    "plot_alignment_qc",
    "plot_spectrogram_qc",
    "write_group_report",
    "write_participant_report",
]
