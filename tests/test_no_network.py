"""No network at run time: both levels succeed where no connection can be made.

The runs happen in a network namespace without interfaces (``unshare --net``); where that is
not possible (no privileges), a ``sitecustomize`` module on ``PYTHONPATH`` makes every socket
connection and name lookup of the Python process fail instead. Either way a probe first proves
that the network really is out of reach. The participant level runs as by default, BIDS
validation included.
"""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import nibabel as nib
import numpy as np

from conftest import GROUP_OPTIONS, PARTICIPANT_OPTIONS, cli_env, spec2vol_command

SITECUSTOMIZE = '''\
"""Block the network for this test: any connection or name lookup raises."""
import socket


def _refuse(*args, **kwargs):
    raise OSError(101, "network is unreachable (blocked by spec2vol's no-network test)")


socket.socket.connect = _refuse
socket.socket.connect_ex = _refuse
socket.create_connection = _refuse
socket.getaddrinfo = _refuse
'''

PROBE = ("import socket\n"
         "try:\n"
         "    socket.create_connection(('1.1.1.1', 53), timeout=3)\n"
         "except OSError:\n"
         "    raise SystemExit(0)\n"
         "raise SystemExit('a connection was made')\n")


def offline(tmp_path: Path) -> tuple[list[str], dict]:
    """A command prefix and an environment under which nothing can reach the network."""
    if shutil.which("unshare") and subprocess.run(["unshare", "--net", "true"], capture_output=True).returncode == 0:
        return ["unshare", "--net"], cli_env()
    blocker = tmp_path / "no-network"
    blocker.mkdir()
    (blocker / "sitecustomize.py").write_text(SITECUSTOMIZE, encoding="utf-8")
    return [], cli_env(PYTHONPATH=str(blocker))


def test_both_levels_run_without_network(simulated_bids, tmp_path):
    prefix, env = offline(tmp_path)
    probe = subprocess.run([*prefix, sys.executable, "-c", PROBE], env=env, capture_output=True, text=True, timeout=60)
    assert probe.returncode == 0, f"the network is reachable: {probe.stderr}"

    out = tmp_path / "out"
    options = [o for o in PARTICIPANT_OPTIONS if o != "--skip-bids-validation"]
    proc = subprocess.run([*prefix, *spec2vol_command(simulated_bids, out, "participant", *options)],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert np.load(out / "sub-02" / "eeg" / "sub-02_task-rest_desc-spec2vol_spectrogram.npy").shape == (20, 16, 16)

    proc = subprocess.run([*prefix, *spec2vol_command(simulated_bids, out, "group", *GROUP_OPTIONS, "--epochs", "1",
                                                      "--split", "fixed", "--test-subjects", "03", "--no-final")],
                          env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert (out / "group_metrics.tsv").read_text().count("sub-03") == 2  # spec2vol and the mean volume
    assert nib.load(out / "sub-03" / "func" / "sub-03_task-rest_desc-synth_bold.nii.gz").shape == (32, 32, 8, 14)
