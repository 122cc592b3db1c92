"""Test support: the real public EEG-fMRI layouts of ``tests/data/public`` made runnable.

Each ``tests/data/public/<accession>/`` folder holds byte-exact copies of the small text files
of a public dataset (``tests/data/public/FACTS.md`` says where each came from and what it
shows). Their large files exist on the public mirrors only as git-annex keys
(``tests/data/public/annex/<accession>.tsv`` gives their sizes). :func:`copy_public` copies a
dataset to a temporary folder and writes, for the runs a test asks for, what the mirror lacks:

* **EEG data** at the real channel count, sampling rate and sample format. ``seconds=S`` writes
  S seconds of signal (a shortened run: white noise plus a 10 Hz rhythm); without it the file
  has the run's full length as a sparse file of zeros, for tests that never read the samples.
* **BrainVision headers and markers** where the mirror keeps them in git-annex only (ds002336,
  ds002338; nm000254's headers): a header naming the real channels in channels.tsv order, the
  real sampling rate, INT_16 at the resolution the dataset's README gives (0.1 µV where it
  gives none), and ``DataFile=`` as the real marker file names it. Real marker files are
  never changed; where none is available, :func:`write_markers` writes R128 per volume.
* **BOLD** series with the number of volumes the test gives (a shortened run has as many
  volumes as triggers fall inside its EEG), on the dataset's grid where its sidecars state it.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import numpy as np

from fixture_data import DATA_DIR, fill_brainvision, write_bold

PUBLIC = DATA_DIR / "public"

#: What the synthesised parts of each dataset are made of (facts from FACTS.md).
DATASETS = {
    # NATVIEW: 5 kHz BrainAmp, real .vmrk files; BOLD 64 x 64 x 38 (BaseResolution, SliceTiming)
    "nm000254": dict(sfreq=5000.0, resolution=0.1, bold_grid=(64, 64, 38)),
    # Lioi XP1/XP2: 5 kHz, "a resolution of 0.5 microV" (README); BOLD 106 x 106 x 32 / 16
    "ds002336": dict(sfreq=5000.0, resolution=0.5, bold_grid=(106, 106, 32)),
    "ds002338": dict(sfreq=5000.0, resolution=0.5, bold_grid=(106, 106, 16)),
    # Daly et al.: EDF at 1000 Hz; the BOLD grid is stated nowhere
    "ds002725": dict(sfreq=1000.0, resolution=None, bold_grid=(32, 32, 16)),
}


def copy_public(name: str, dst: str | Path) -> Path:
    """Copy ``tests/data/public/<name>`` to ``dst`` (the real files only); return ``dst``."""
    dst = Path(dst)
    shutil.copytree(PUBLIC / name, dst, copy_function=shutil.copyfile)
    return dst


def channel_names(channels_tsv: Path) -> list[str]:
    """The ``name`` column of a channels.tsv, read plainly (test-side, independent of spec2vol):
    tab- or space-separated, quotes (including typographic ones) stripped."""
    lines = [line for line in channels_tsv.read_text(encoding="utf-8").splitlines() if line.strip()]
    sep = "\t" if "\t" in lines[0] else None
    names = [line.split(sep)[0].strip() for line in lines[1:]]
    return [n.strip("'\"\u2018\u2019\u201c\u201d") for n in names]


def write_brainvision_header(vhdr: Path, channels: list[str], *, sfreq: float, resolution: float,
                             data_file: str | None = None, marker_file: str | None = None) -> Path:
    """A BrainVision Recorder-style header: INT_16, multiplexed, the channels in this order."""
    lines = [
        "Brain Vision Data Exchange Header File Version 1.0",
        "; synthesised by spec2vol's tests: the dataset's own header is in git-annex only",
        "", "[Common Infos]", "Codepage=UTF-8",
        f"DataFile={data_file or vhdr.with_suffix('.eeg').name}",
        f"MarkerFile={marker_file or vhdr.with_suffix('.vmrk').name}",
        "DataFormat=BINARY", "DataOrientation=MULTIPLEXED",
        f"NumberOfChannels={len(channels)}",
        f"SamplingInterval={1e6 / sfreq:g}",
        "", "[Binary Infos]", "BinaryFormat=INT_16", "", "[Channel Infos]",
    ]
    lines += [f"Ch{i}={name},,{resolution:g},\u00b5V" for i, name in enumerate(channels, 1)]
    vhdr.write_text("\r\n".join(lines) + "\r\n", encoding="utf-8")
    return vhdr


def write_markers(vmrk: Path, data_file: str, triggers, extra=()) -> Path:
    """A BrainVision marker file: New Segment, one ``Response,R128`` per trigger sample (0-based)
    and ``extra`` (sample, type, description) markers, in time order."""
    rows = [(int(s), "Response", "R128") for s in triggers] + [(int(s), t, d) for s, t, d in extra]
    lines = ["Brain Vision Data Exchange Marker File, Version 1.0", "", "[Common Infos]",
             "Codepage=UTF-8", f"DataFile={data_file}", "", "[Marker Infos]",
             "Mk1=New Segment,,1,1,0,20200101120000000000"]
    lines += [f"Mk{i}={t},{d},{s + 1},1,0" for i, (s, t, d) in enumerate(sorted(rows), 2)]
    vmrk.write_text("\r\n".join(lines) + "\r\n", encoding="utf-8")
    return vmrk


def fill_eeg(vhdr: Path, *, seconds: float | None, full_seconds: float, seed=0) -> Path:
    """Write the data file a header names: ``seconds`` of signal, or ``full_seconds`` of zeros
    as a sparse file (no disk blocks; for tests that never read the samples)."""
    if seconds is not None:
        return fill_brainvision(vhdr, seed=seed, seconds=seconds)
    text = vhdr.read_text(encoding="utf-8")
    common = dict(line.split("=", 1) for line in text.splitlines() if "=" in line and not line.startswith(";"))
    data = vhdr.parent / common["DataFile"]
    n_samples = int(round(full_seconds * 1e6 / float(common["SamplingInterval"])))
    with open(data, "wb") as fh:
        fh.truncate(n_samples * int(common["NumberOfChannels"]) * 2)
    return data


def write_edf(path: Path, channels: list[str], *, sfreq: float, seconds: float,
              signal_seconds: float | None, seed=0) -> Path:
    """A plain EDF file (1-s records, 16 bit, ±3276.7 µV): ``signal_seconds`` of noise plus a
    10 Hz rhythm, the rest of ``seconds`` zeros (sparse)."""
    n = int(sfreq)
    records = int(round(seconds))

    def field(value, width):
        return str(value)[:width].ljust(width).encode("ascii")

    header = b"".join([
        field(0, 8), field("X X X X", 80), field("Startdate 01-JAN-2020 X X X", 80),
        field("01.01.20", 8), field("12.00.00", 8), field(256 * (len(channels) + 1), 8),
        field("", 44), field(records, 8), field(1, 8), field(len(channels), 4)])
    per_signal = [
        [field(c, 16) for c in channels], [field("", 80)] * len(channels),
        [field("uV", 8)] * len(channels), [field(-3276.8, 8)] * len(channels),
        [field(3276.7, 8)] * len(channels), [field(-32768, 8)] * len(channels),
        [field(32767, 8)] * len(channels), [field("", 80)] * len(channels),
        [field(n, 8)] * len(channels), [field("", 32)] * len(channels)]
    header += b"".join(b"".join(column) for column in per_signal)
    with open(path, "wb") as fh:
        fh.write(header)
        if signal_seconds:
            rng = np.random.default_rng(seed)
            t = np.arange(int(signal_seconds) * n) / sfreq
            gain = rng.uniform(2, 12, len(channels))
            data = 5 * rng.standard_normal((len(channels), t.size)) + gain[:, None] * np.sin(2 * np.pi * 10 * t)
            digital = np.clip(np.rint(data * 10), -32768, 32767).astype("<i2")  # 0.1 µV per unit
            # records: (record, channel, sample)
            fh.write(digital.reshape(len(channels), -1, n).transpose(1, 0, 2).tobytes())
        fh.truncate(len(header) + records * len(channels) * n * 2)
    return path


def write_public_bold(root: Path, name: str, rel: str, n_volumes: int, tr: float,
                      grid=None, seed=0) -> Path:
    """The BOLD series ``rel`` of dataset ``name``: ``n_volumes`` volumes on its grid."""
    path = root / rel
    path.parent.mkdir(parents=True, exist_ok=True)
    grid = tuple(grid or DATASETS[name]["bold_grid"])
    return write_bold(path, np.random.default_rng(seed), n_volumes=n_volumes, tr=tr, grid=grid)


def eeg_json(path: Path) -> dict:
    return json.loads(path.read_text(encoding="utf-8"))


def sparse_size(path: Path) -> tuple[int, int]:
    """(apparent size, bytes on disk) of a file."""
    st = os.stat(path)
    return st.st_size, st.st_blocks * 512
