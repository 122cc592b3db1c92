"""spec2vol: a BIDS-App that synthesises fMRI volumes from scalp EEG with Spec2VolCAMU-Net."""

__version__ = "0.1.0"
