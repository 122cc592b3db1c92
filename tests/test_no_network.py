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
    # spec2vol, the mean volume and the oracle ceiling of the simulated dataset
    assert (out / "group_metrics.tsv").read_text().count("sub-03") == 3
    assert nib.load(out / "sub-03" / "func" / "sub-03_task-rest_desc-synth_bold.nii.gz").shape == (32, 32, 8, 14)


RECORDER = '''\
"""Record every attempt to reach the network (then refuse it), for the template-space test."""
import os
import socket


def _record(*args, **kwargs):
    with open(os.environ["SPEC2VOL_NETWORK_LOG"], "a") as fh:
        fh.write(repr(args[:2]) + "\\n")
    raise OSError(101, "network is unreachable (blocked by spec2vol's no-network test)")


socket.socket.connect = _record
socket.socket.connect_ex = _record
socket.create_connection = _record
socket.getaddrinfo = _record
'''


def test_template_space_derivatives_make_no_request(simulated_bids_source, tmp_path):
    """fMRIPrep derivatives in MNI152NLin2009cAsym with their own brain masks, on a node without
    network: with an empty TemplateFlow home and with one holding the template, both levels run
    and nothing tries to reach the network."""
    from test_fmriprep import SPACE, _fmriprep, _templateflow_home

    deriv = _fmriprep(simulated_bids_source, tmp_path / "fmriprep")
    recorder = tmp_path / "recorder"
    recorder.mkdir()
    (recorder / "sitecustomize.py").write_text(RECORDER, encoding="utf-8")
    log = tmp_path / "requests.log"
    populated = _templateflow_home(tmp_path / "populated", mask=False)
    empty = tmp_path / "empty"
    empty.mkdir()
    prefix, _ = offline(tmp_path)
    out = tmp_path / "out"
    participant = ("participant", *PARTICIPANT_OPTIONS, "--bold-derivatives", deriv)
    group = ("group", *GROUP_OPTIONS, "--epochs", "1", "--split", "fixed", "--test-subjects", "03",
             "--no-final", "--skip-bids-validation")
    # both levels with an empty home, then the participant level (which refreshes the reports)
    # with a home that holds the template
    for home, args in [(empty, participant), (empty, group), (populated, participant)]:
        env = cli_env(PYTHONPATH=str(recorder), SPEC2VOL_NETWORK_LOG=str(log),
                      TEMPLATEFLOW_HOME=str(home))
        proc = subprocess.run([*prefix, *spec2vol_command(simulated_bids_source, out, *args)],
                              env=env, capture_output=True, text=True, timeout=300)
        assert proc.returncode == 0, proc.stderr
        report = (out / ("group.html" if args is group else "sub-03.html")).read_text(encoding="utf-8")
        if args is group:
            assert "the MNI152 2009 symmetric template shipped with nilearn" in report
    assert f"the {SPACE} T1w template from TemplateFlow" in report
    assert not log.exists(), log.read_text()
    assert sorted(p.name for p in populated.rglob("*") if p.is_file()) == [
        "template_description.json", f"tpl-{SPACE}_res-02_T1w.nii.gz"]
    assert not list(empty.iterdir())
