"""Simulate simultaneous EEG-fMRI BIDS datasets whose EEG genuinely predicts the BOLD signal.

Latent sources shared by all subjects each drive the power of an EEG oscillation (their own
frequency band and scalp topography) and, through the haemodynamic response, the BOLD signal
in their own map; the ground truth goes to ``derivatives/simulation/``. The package's parts:

* :mod:`.latent`: the sources, their time courses, the HRF, topographies and BOLD maps;
* :mod:`.eeg_writers`: a run's EEG and its BrainVision, BDF, EDF and EEGLAB files;
* :mod:`.bold`: each subject's anatomy and the BOLD runs;
* :mod:`.options`: checking the options;
* :mod:`.dataset`: :func:`simulate_dataset` and the raw dataset's files;
* :mod:`.truth`: the ground-truth derivative;
* :mod:`.cli`: the ``spec2vol-simulate`` command (:func:`main`).
"""

from spec2vol_bids.simulate.bold import grid_affine
from spec2vol_bids.simulate.cli import main
from spec2vol_bids.simulate.dataset import simulate_dataset
from spec2vol_bids.simulate.eeg_writers import (ECG_CHANNEL, EEG_FORMATS, GENERATOR, GROUND, LINE_FREQ,
                                                REFERENCE, VOLUME_MARKERS)
from spec2vol_bids.simulate.latent import MAX_SOURCES, channel_names

__all__ = ["ECG_CHANNEL", "EEG_FORMATS", "GENERATOR", "GROUND", "LINE_FREQ", "MAX_SOURCES", "REFERENCE",
           "VOLUME_MARKERS", "channel_names", "grid_affine", "main", "simulate_dataset"]
