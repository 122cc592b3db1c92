"""Fuzz the readers: damaged BrainVision headers, markers and NIfTI headers never crash the tool.

Hypothesis draws one to three mutations of one participant's ``.vhdr``, ``.vmrk`` and BOLD
NIfTI header (raw header fields set to odd values, lines deleted, duplicated or garbled,
files cut short) and runs the participant level on the damaged copy. Whatever the damage, the
BIDS-App must either succeed with loadable outputs or fail with exit 65 or 66 and a single
``spec2vol: error:`` line: never a traceback, an internal error (exit 1), a signal or a hang.
"""

from __future__ import annotations

import gzip
import shutil
import subprocess
import tempfile
from pathlib import Path

import nibabel as nib
import numpy as np
from hypothesis import HealthCheck, Phase, event, given, settings
from hypothesis import strategies as st

from conftest import PARTICIPANT_OPTIONS, error_line, partial_files, run_spec2vol, unreadable_outputs

TEXT_VALUES = ["", "0", "-1", "1", "2", "17", "16", "4000", "999999999", "1e309", "nan", "abc",
               "INT_16", "IEEE_FLOAT_32", "INT_32", "MULTIPLEXED", "VECTORIZED", "ASCII",
               "Response,R128,501,1,0", "New Segment,,1,1,0", "µV", ",,,", "=", "[Common Infos]"]

# Raw NIfTI-1 header fields and values to put there, chosen to stay small in memory: no field
# value makes the image larger than a few tens of MB.
HEADER_VALUES = {
    "sizeof_hdr": [0, 348, 540, 1234],
    "magic": [b"n+1", b"ni1", b"n+2", b"xyz", b""],
    "dim": [-1, 0, 1, 2, 3, 4, 5, 7, 8, 16, 33, 1000],
    "datatype": [0, 1, 2, 4, 8, 16, 64, 128, 255, 2304, 32767],
    "bitpix": [0, 1, 8, 16, 64, 255],
    "pixdim": [0.0, -2.0, np.nan, np.inf, 1e-9, 2.0, 2000.0, 1e9],
    "vox_offset": [0.0, 100.0, 352.0, 353.0, 1e6, -5.0, np.nan],
    "scl_slope": [0.0, np.nan, np.inf, -1.0, 1e30],
    "scl_inter": [np.nan, -np.inf, 1e30],
    "xyzt_units": [0, 1, 2, 3, 8, 16, 24, 255],
    "qform_code": [-1, 0, 1, 2, 5, 127],
    "sform_code": [-1, 0, 1, 4, 127],
    "slice_duration": [np.nan, -1.0],
}

text_value = st.one_of(st.sampled_from(TEXT_VALUES),
                       st.text(alphabet=st.characters(blacklist_categories=("Cs",)), max_size=12))
text_mutation = st.tuples(st.sampled_from([".vhdr", ".vmrk"]),
                          st.sampled_from(["set", "delete", "duplicate", "garble", "truncate"]),
                          st.integers(0, 10_000), text_value)
header_mutation = st.sampled_from(sorted(HEADER_VALUES)).flatmap(
    lambda field: st.tuples(st.just(".nii.gz"), st.just(field), st.integers(0, 7),
                            st.sampled_from(HEADER_VALUES[field])))
mutations = st.lists(st.one_of(text_mutation, header_mutation), min_size=1, max_size=3)


def mutate_text(path: Path, kind: str, position: int, value: str) -> None:
    raw = path.read_bytes()
    if kind == "truncate":
        path.write_bytes(raw[:position % (len(raw) + 1)])
        return
    lines = raw.decode("utf-8").splitlines()
    i = position % len(lines)
    if kind == "set":
        key = lines[i].split("=", 1)[0]
        lines[i] = f"{key}={value}" if "=" in lines[i] else value
    elif kind == "delete":
        del lines[i]
    elif kind == "duplicate":
        lines.insert(i, lines[i])
    else:  # garble: overwrite part of the line with the value
        lines[i] = value + lines[i][len(value):]
    path.write_text("\n".join(lines) + "\n", encoding="utf-8")


def mutate_header(path: Path, field: str, index: int, value) -> None:
    """Set a raw NIfTI-1 header field, bypassing nibabel's checks, and keep the data."""
    raw = bytearray(gzip.decompress(path.read_bytes()))
    header = np.frombuffer(raw, dtype=nib.nifti1.header_dtype, count=1).copy()
    target = header[field][0]
    if np.ndim(target):
        target[index % len(target)] = value
    else:
        header[field] = value
    raw[:nib.nifti1.header_dtype.itemsize] = header.tobytes()
    path.write_bytes(gzip.compress(bytes(raw), compresslevel=1))


def one_participant(source: Path, dst: Path) -> Path:
    """A dataset holding only sub-01 of ``source``."""
    dst.mkdir()
    for name in ("dataset_description.json", "participants.tsv", "participants.json"):
        shutil.copy2(source / name, dst / name)
    shutil.copytree(source / "sub-01", dst / "sub-01")
    return dst


# No shrinking: each example costs a subprocess run of a second or more, and the mutations
# are already small (one to three), so the first failing example is reported as found.
@settings(max_examples=12, deadline=None, derandomize=True, database=None,
          phases=[Phase.explicit, Phase.generate],
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(changes=mutations)
def test_damaged_headers_never_crash_the_participant_level(simulated_bids_source, changes):
    with tempfile.TemporaryDirectory(prefix="spec2vol-fuzz-") as tmp:
        bids = one_participant(simulated_bids_source, Path(tmp) / "bids")
        stem = bids / "sub-01"
        for ext, kind, position, value in changes:
            if ext == ".nii.gz":
                mutate_header(stem / "func" / "sub-01_task-rest_bold.nii.gz", kind, position, value)
            else:
                mutate_text(stem / "eeg" / f"sub-01_task-rest_eeg{ext}", kind, position, value)
        out = Path(tmp) / "out"
        try:
            proc = run_spec2vol(bids, out, "participant", *PARTICIPANT_OPTIONS, timeout=90)
        except subprocess.TimeoutExpired as exc:
            raise AssertionError(f"the participant level hung after {changes}") from exc
        event(f"exit {proc.returncode}")
        assert proc.returncode in (0, 65, 66), f"exit {proc.returncode} after {changes}:\n{proc.stderr}"
        assert "Traceback" not in proc.stderr, proc.stderr
        if proc.returncode:
            error_line(proc.stderr)
        else:
            assert (out / "sub-01" / "eeg" / "sub-01_task-rest_desc-spec2vol_spectrogram.npy").is_file()
        assert partial_files(out) == []
        assert unreadable_outputs(out) == []
