"""Model configurations: plain dataclasses, JSON-serialisable with ``dataclasses.asdict``."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(kw_only=True)
class ModelConfig:
    """What every model needs to know about its inputs and outputs.

    Attributes
    ----------
    name : str
        Registry name of the model (``spec2vol``, ``e2fnet``, ``mean``).
    context : int
        TR windows per input sample.
    eeg_channels : int
        EEG channels per window.
    freq_bins : int
        Frequency bins per channel.
    out_shape : tuple of int
        Output volume (D, H, W), slices first.
    readout_components : int
        0: the network outputs volumes (the published protocol). ``k`` > 0: the network's
        output is a deviation from the training subjects' mean volume, kept to the span of their
        responses' ``k`` leading components and joined by a linear readout of the input
        (:class:`spec2vol_bids.models.residual.ResidualOutput`; the residual protocol).
    readout_kernels : int
        With ``readout_components``: 0, the readout weighs every context window on its own
        (models saved by earlier versions); R > 0, it learns R lag profiles shared by all band
        features (:class:`spec2vol_bids.models.residual.KernelReadout`).
    """

    name: str
    context: int
    eeg_channels: int
    freq_bins: int
    out_shape: tuple[int, int, int]
    readout_components: int = 0
    readout_kernels: int = 0

    def __post_init__(self):
        # JSON brings tuples back as lists.
        self.out_shape = tuple(int(n) for n in self.out_shape)
        for field in ("readout_components", "readout_kernels"):
            if int(getattr(self, field)) < 0:
                raise ValueError(f"{field} must not be negative, got {getattr(self, field)}")
        for field in ("context", "eeg_channels", "freq_bins"):
            if int(getattr(self, field)) < 1:
                raise ValueError(f"{field} must be positive, got {getattr(self, field)}")
        if len(self.out_shape) != 3 or min(self.out_shape) < 1:
            raise ValueError(f"out_shape must be three positive sizes (D, H, W), "
                             f"got {self.out_shape}")
