"""HTML reports, QC figures and provenance, on a small derivative dataset built by hand."""

from __future__ import annotations

import base64
import json
import re
import shutil
import subprocess
import tomllib
import xml.etree.ElementTree as ET
from datetime import datetime, timedelta, timezone
from html.parser import HTMLParser
from pathlib import Path

import mne
import nibabel as nib
import numpy as np
import pytest

from spec2vol_bids.derivatives import write_json
from spec2vol_bids.naming import build_name
from spec2vol_bids.triggers import VolumeTiming, volume_timing
from spec2vol_bids.provenance import write_provenance
from spec2vol_bids.report import (
    plot_alignment_qc,
    plot_spectrogram_qc,
    write_group_report,
    write_participant_report,
)

SUBJECTS = ("01", "02", "03")
MODELS = ("spec2vol", "mean-baseline")
CHANNELS = ["Fp1", "Fp2", "C3", "C4", "P3", "P4", "O1", "Oz"]
TR, N_VOL, N_FREQ = 2.0, 40, 16
SHAPE = (10, 12, 6)
HOSTILE = "<script>alert('x')</script> & more"


def _nifti(path: Path, data: np.ndarray, zooms) -> None:
    affine = np.diag([*zooms[:3], 1.0])
    affine[:3, 3] = [-30.0, -40.0, -10.0]
    img = nib.Nifti1Image(data.astype(np.float32), affine)
    img.header.set_zooms(zooms)
    path.parent.mkdir(parents=True, exist_ok=True)
    nib.save(img, path)


def _brain(rng, n_vol: int) -> np.ndarray:
    """A bright ellipsoid with a fluctuating blob, each volume scaled to [0, 1]."""
    x, y, z = np.meshgrid(*(np.linspace(-1, 1, n) for n in SHAPE), indexing="ij")
    brain = ((x**2 + y**2 + z**2) < 0.8).astype(float)
    blob = np.exp(-((x - 0.3) ** 2 + y**2 + z**2) / 0.05)
    series = brain[..., None] * (0.6 + 0.2 * blob[..., None] * rng.standard_normal(n_vol))
    series += 0.02 * rng.random(series.shape)
    lo = series.min(axis=(0, 1, 2), keepdims=True)
    return (series - lo) / (series.max(axis=(0, 1, 2), keepdims=True) - lo)


def _subject(out: Path, sub: str, rng, *, synth: bool) -> None:
    ents = {"subject": sub, "task": "rest", "run": "1"}
    eeg_dir, func_dir = out / f"sub-{sub}" / "eeg", out / f"sub-{sub}" / "func"
    eeg_dir.mkdir(parents=True)
    freqs = (np.arange(N_FREQ) + 1) / TR
    spec = rng.standard_normal((N_VOL, len(CHANNELS), N_FREQ)).astype(np.float32)
    np.save(eeg_dir / build_name(ents, "spectrogram", ".npy", desc="spec2vol"), spec)
    onsets = 3.0 + TR * np.arange(N_VOL)
    onsets[25:] += 0.3  # a late marker: the QC figure must flag it
    write_json(eeg_dir / build_name(ents, "spectrogram", ".json", desc="spec2vol"), {
        "SamplingFrequency": 250.0, "RepetitionTime": TR, "WindowSamples": 500,
        "FrequencyBinsHz": freqs, "Channels": CHANNELS, "DroppedChannels": ["ECG", HOSTILE],
        "VolumeOnsetSeconds": 3.0, "VolumeMarker": "Scanner/Scan Start",
        "NumberOfWindows": N_VOL, "DiscardVolumes": 6, "Context": 20, "Sources": [],
        "InputHash": "0"})
    target = _brain(rng, N_VOL)
    _nifti(func_dir / build_name(ents, "bold", ".nii.gz", desc="target"), target, (3, 3, 4, TR))
    if synth:
        # the first discard + context volumes have no prediction and are left out
        _nifti(func_dir / build_name(ents, "bold", ".nii.gz", desc="synth"),
               0.8 * target[..., 26:] + 0.1, (3, 3, 4, TR))
        write_json(func_dir / build_name(ents, "bold", ".json", desc="synth"), {
            "Model": "spec2vol", "Fold": sub, "RepetitionTime": TR, "SkullStripped": False,
            "Sources": [], "SourceVolumes": [26, N_VOL - 1]})
        r = np.clip(rng.normal(0.2, 0.2, SHAPE), -1, 1) * (target[..., 0] > 0.3)
        _nifti(func_dir / build_name(ents, "statmap", ".nii.gz", desc="dynamics"), r, (3, 3, 4))
    fig_dir = out / f"sub-{sub}" / "figures"
    timing = VolumeTiming(np.rint(onsets * 250).astype(int), TR, 250.0, int(TR * 250))
    plot_alignment_qc(timing, fig_dir / build_name(ents, "qc", ".svg", desc="alignment"),
                      title=f"sub-{sub} run-1")
    plot_spectrogram_qc(spec, freqs, CHANNELS,
                        fig_dir / build_name(ents, "qc", ".svg", desc="spectrogram"))
    (out / f"sub-{sub}" / f"sub-{sub}_runs.tsv").write_text(
        "run\teeg\tbold\tstatus\tnote\n"
        f"task-rest_run-1\teeg/sub-{sub}_task-rest_run-1_eeg.vhdr\t"
        f"func/sub-{sub}_task-rest_run-1_bold.nii.gz\tpaired\tn/a\n"
        f"task-rest_run-2\teeg/sub-{sub}_task-rest_run-2_eeg.vhdr\tn/a\tunpaired\t{HOSTILE}\n")


@pytest.fixture(scope="module")
def derivatives(tmp_path_factory) -> Path:
    """An OUTPUT_DIR after both levels: three subjects, two models, two folds."""
    out = tmp_path_factory.mktemp("out")
    rng = np.random.default_rng(42)
    for sub in SUBJECTS:
        _subject(out, sub, rng, synth=True)
    rows = ["participant_id\tmodel\tfold\tssim\tpsnr\tssim3d\tdynamics\tn_samples"]
    for sub in SUBJECTS:
        for model, base in zip(MODELS, (0.70, 0.62)):
            rows.append(f"sub-{sub}\t{model}\t{sub}\t{base + rng.normal(0, 0.03):.4f}\t"
                        f"{20 + rng.normal(0, 1):.3f}\t{base + 0.05:.4f}\t"
                        f"{(0.15 if model == 'spec2vol' else 0.0) + rng.normal(0, 0.05):.4f}\t14")
    rows.append("sub-03\tspec2vol-untrained\t03\tn/a\tn/a\tn/a\tn/a\t0")
    (out / "group_metrics.tsv").write_text("\n".join(rows) + "\n")
    for fold in ("01", "02"):
        hist = ["epoch\tstep\ttrain_loss\tval_loss\tval_ssim\tlr\tseconds"]
        for epoch in range(1, 6):
            hist.append(f"{epoch}\t{epoch * 10}\t{0.5 / epoch:.4f}\t{0.55 / epoch + 0.05:.4f}\t"
                        f"{0.4 + 0.05 * epoch:.4f}\t0.001\t{epoch * 1.5:.1f}")
        (out / "models" / f"fold-{fold}").mkdir(parents=True)
        (out / "models" / f"fold-{fold}" / "history.tsv").write_text("\n".join(hist) + "\n")
    start = datetime(2025, 5, 14, 10, 0, 0)
    write_provenance(out, level="participant", argv=["spec2vol", "/data", str(out), "participant"],
                     config={"inputs": {"participant_label": ["01", "02"]},
                             "participant": {"context": 7, "task": HOSTILE}},
                     seeds=0, started=start - timedelta(minutes=9),
                     finished=start - timedelta(minutes=8), stages={})
    write_provenance(out, level="group", argv=["spec2vol", "/data", str(out), "group"],
                     config={"epochs": 5, "note": HOSTILE, "model": None}, seeds={"torch": 1},
                     started=start, finished=start + timedelta(minutes=3),
                     stages={"train": (start, start + timedelta(minutes=2))})
    for sub in SUBJECTS:
        write_participant_report(out, sub)
    write_group_report(out)
    return out


class _Collector(HTMLParser):
    """Every tag with its attributes, and the text inside each <svg>."""

    def __init__(self):
        super().__init__()
        self.tags: list[tuple[str, dict]] = []
        self.svg_depth = 0
        self.svg_sizes: list[int] = []

    def handle_starttag(self, tag, attrs):
        self.tags.append((tag, dict(attrs)))
        if tag == "svg":
            self.svg_depth += 1
            self.svg_sizes.append(0)
        elif self.svg_depth:
            self.svg_sizes[-1] += 1

    def handle_endtag(self, tag):
        if tag == "svg":
            self.svg_depth -= 1


def _parse(path: Path) -> _Collector:
    collector = _Collector()
    collector.feed(path.read_text(encoding="utf-8"))
    return collector


def _check_images(path: Path) -> int:
    """Assert every image of ``path`` is an embedded, decodable, non-empty picture."""
    page = _parse(path)
    images = [attrs for tag, attrs in page.tags if tag == "img"]
    for attrs in images:
        src = attrs.get("src", "")
        match = re.fullmatch(r"data:(image/(?:png|svg\+xml));base64,([A-Za-z0-9+/=]+)", src)
        assert match, f"{path.name}: image not embedded: {src[:60]!r}"
        payload = base64.b64decode(match.group(2), validate=True)
        if match.group(1) == "image/png":
            assert payload.startswith(b"\x89PNG\r\n\x1a\n") and len(payload) > 1000
        else:
            root = ET.fromstring(payload)
            assert root.tag.endswith("svg") and len(list(root.iter())) > 20
    assert all(n > 0 for n in page.svg_sizes), f"{path.name}: empty inline <svg>"
    for tag, attrs in page.tags:
        assert tag not in ("script", "link", "iframe", "object", "embed")
        for name in ("src", "href"):
            value = attrs.get(name) or ""
            assert not re.match(r"(https?:)?//", value), f"{path.name}: external {name} {value}"
    return len(images) + len(page.svg_sizes)


def test_reports_are_self_contained(derivatives):
    sub_report = derivatives / "sub-01.html"
    group_report = derivatives / "group.html"
    # alignment + spectrogram SVGs and the slices PNG; metric, curve and map PNGs
    assert _check_images(sub_report) >= 3
    assert _check_images(group_report) >= 3
    text = sub_report.read_text(encoding="utf-8")
    assert HOSTILE not in text and html_escaped(HOSTILE) in text
    for channel in CHANNELS:
        assert channel in text
    assert "1 paired" in text and "1 unpaired" in text
    assert "mean-baseline" in text and "Scanner/Scan Start" in text
    assert "at volumes 29, 32, 36 " in text  # inside the synthesised span [26, 39]
    group = group_report.read_text(encoding="utf-8")
    assert HOSTILE not in group and html_escaped(HOSTILE) in group
    assert "epochs = 5" in group
    assert "context = 7" in group and "(sub-01 sub-02)" in group  # the participant level's
    assert 'href="sub-02.html"' in group
    # the mean ± std table: spec2vol's mean SSIM over the three subjects
    table = _read_metrics_rows(derivatives)
    mean = np.mean([float(r["ssim"]) for r in table if r["model"] == "spec2vol"])
    assert f"{mean:.3f} ± " in group
    assert 'class="empty"' not in group  # every section had data


def html_escaped(text: str) -> str:
    import html

    return html.escape(text, quote=True)


def _read_metrics_rows(out: Path) -> list[dict]:
    lines = (out / "group_metrics.tsv").read_text().splitlines()
    header = lines[0].split("\t")
    return [dict(zip(header, line.split("\t"))) for line in lines[1:]]


def test_reports_say_what_is_missing(tmp_path):
    (tmp_path / "sub-07" / "eeg").mkdir(parents=True)
    sub = write_participant_report(tmp_path, "sub-07").read_text(encoding="utf-8")
    assert "no pairing inventory" in sub
    assert "no EEG spectrograms yet: run the participant level" in sub
    assert "no metrics yet: run the group level" in sub
    group = write_group_report(tmp_path).read_text(encoding="utf-8")
    for message in ("no group metrics yet", "no training history yet",
                    "no voxel-wise dynamics maps yet", "no configuration recorded yet"):
        assert message in group
    assert "<img" not in group


def test_group_report_shows_the_folds_it_scores(derivatives, tmp_path):
    """A fold folder of an earlier plan (its subject since dropped) is not this table's: its
    curve is left out; a fixed split is called one."""
    out = Path(shutil.copytree(derivatives, tmp_path / "out"))
    shutil.copytree(out / "models" / "fold-01", out / "models" / "fold-09")
    text = write_group_report(out).read_text(encoding="utf-8")
    assert "Learning curves of 2 fold(s)" in text and "(leave-one-subject-out)" in text
    table = (out / "group_metrics.tsv").read_text().splitlines()
    rows = [line.split("\t") for line in table[1:]]
    for row in rows:
        row[2] = "fixed"
    (out / "group_metrics.tsv").write_text("\n".join([table[0], *("\t".join(r) for r in rows)]) + "\n")
    text = write_group_report(out).read_text(encoding="utf-8")
    assert "(a fixed split)" in text and "leave-one-subject-out" not in text


def test_participant_report_without_synthesis(derivatives, tmp_path):
    out = tmp_path / "out"
    shutil.copytree(derivatives / "sub-02", out / "sub-02")
    for path in (out / "sub-02" / "func").glob("*desc-synth*"):
        path.unlink()
    text = write_participant_report(out, "02").read_text(encoding="utf-8")
    assert "no synthesised BOLD yet: run the group level" in text
    assert _check_images(out / "sub-02.html") >= 3
    # a run timed by --eeg-offset: the table says so, and where its first volume lies
    sidecar = next((out / "sub-02" / "eeg").glob("*_spectrogram.json"))
    meta = json.loads(sidecar.read_text())
    sidecar.write_text(json.dumps({**meta, "VolumeMarker": None, "VolumeOnsetSeconds": 2.5}))
    text = write_participant_report(out, "02").read_text(encoding="utf-8")
    assert "none: --eeg-offset 2.5 s" in text and "sample 0" not in text
    assert re.search(r"<td[^>]*>2\.5</td>", text)


def test_qc_figures_are_deterministic_svg(tmp_path):
    # a train with a stray trigger before it and two triggers missing inside
    train = 3000 + np.arange(30) * 1000
    info = mne.create_info(["Cz", "Pz"], 500.0, "eeg")
    raw = mne.io.RawArray(np.zeros((2, 40000)), info, verbose=False)
    markers = np.r_[1200, np.delete(train, [7, 8])] / 500.0
    raw.set_annotations(mne.Annotations(markers, 0.0, ["Response/R128"] * len(markers)))
    timing = volume_timing(raw, 2.0, n_volumes=30, discard=2, context=4)
    first = plot_alignment_qc(timing, tmp_path / "a.svg")
    second = plot_alignment_qc(timing, tmp_path / "b.svg")
    assert first.read_bytes() == second.read_bytes()
    root = ET.parse(first).getroot()
    assert root.tag == "{http://www.w3.org/2000/svg}svg"
    # what the figure's title and marks show (its text is drawn as paths)
    meta = timing.sidecar()["VolumeTiming"]
    assert meta["FilledVolumes"] == [7, 8] and meta["StrayMarkersSeconds"] == [2.4]
    # a single volume cannot give an interval, yet the figure is still made
    one = VolumeTiming(np.array([2500]), 2.0, 500.0, 1000)
    assert plot_alignment_qc(one, tmp_path / "one.svg").stat().st_size > 1000
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.svg", "b.svg", "one.svg"]
    with pytest.raises(ValueError, match="does not match"):
        plot_spectrogram_qc(np.zeros((5, 3, 4)), np.arange(4), ["a", "b"], tmp_path / "s.svg")
    assert not (tmp_path / "s.svg").exists()


def test_provenance_records(derivatives):
    logs = derivatives / "logs"
    assert len([p for p in logs.iterdir() if p.is_dir() and p.name.startswith("participant-")]) == 1
    run_dirs = [p for p in logs.iterdir() if p.is_dir() and p.name.startswith("group-")]
    assert len(run_dirs) == 1 and re.fullmatch(r"group-20250514-100000-\d+", run_dirs[0].name)
    config = tomllib.loads((run_dirs[0] / "config.toml").read_text())
    assert config == {"epochs": 5, "note": HOSTILE}  # None has no TOML form: left out
    assert (logs / "config.toml").read_text() == (run_dirs[0] / "config.toml").read_text()
    record = json.loads((run_dirs[0] / "provenance.json").read_text())
    assert record["CommandLine"][-1] == "group" and record["Seeds"] == {"torch": 1}
    assert record["Seconds"] == 180.0 and record["Stages"]["train"]["seconds"] == 120.0
    import numpy

    assert record["Versions"]["numpy"] == numpy.__version__
    for name in ("python", "spec2vol", "torch", "mne", "mne-bids", "pybids", "nibabel",
                 "nilearn", "pandas", "torchmetrics", "matplotlib", "scipy"):
        assert record["Versions"][name]
    citation = (logs / "CITATION.md").read_text()
    for needle in ("arXiv:2505.09521", "E2fNet", "PyBIDS", "MNE-Python", "MNE-BIDS", "nilearn",
                   "PyTorch", "joss.01294", "joss.01896"):
        assert needle in citation


def test_provenance_types_and_concurrent_levels(tmp_path):
    start = datetime(2025, 1, 2, 3, 4, 5)
    config = {"paths": {"bids": tmp_path, "skip": None}, "labels": ("01", None, "02"),
              "lr": np.float32(0.5), "sizes": np.array([2, 3]), "flags": {"b", "a"}}
    a = write_provenance(tmp_path, level="participant", argv=["spec2vol"], config=config,
                         seeds=0, started=start, finished=start.timestamp() + 5,
                         stages={"read": {"started": start.isoformat(), "finished": None},
                                 "runs": [{"npy": tmp_path / "a.npy", "ok": True}]})
    b = write_provenance(tmp_path, level="group", argv=["spec2vol"], config={}, seeds=0,
                         started=start, finished=start, stages={})
    assert a != b and a.parent == b.parent == tmp_path / "logs"
    loaded = tomllib.loads((a / "config.toml").read_text())
    assert loaded == {"paths": {"bids": str(tmp_path)}, "labels": ["01", "02"], "lr": 0.5,
                      "sizes": [2, 3], "flags": ["a", "b"]}
    record = json.loads((a / "provenance.json").read_text())
    assert record["Seconds"] == 5.0
    assert record["Stages"]["read"]["finished"] is None and "seconds" not in record["Stages"]["read"]
    assert record["Stages"]["runs"] == [{"npy": str(tmp_path / "a.npy"), "ok": True}]
    # an aware start time names the folder in local time, like the command line's log files
    aware = datetime(2025, 1, 2, 3, 4, 5, tzinfo=timezone.utc)
    c = write_provenance(tmp_path, level="group", argv=[], config={}, seeds=None, started=aware,
                         finished=aware, stages={})
    assert aware.astimezone().strftime("%Y%m%d-%H%M%S") in c.name


def _chromium() -> str:
    path = shutil.which("chromium") or shutil.which("chromium-browser")
    assert path, "Debian's chromium package is needed: apt-get install -y chromium"
    return path


def _render(page: Path, tmp_path: Path) -> tuple[list[str], Path]:
    """Load ``page`` in headless Chromium; return its console messages and a screenshot."""
    shot = tmp_path / f"{page.stem}.png"
    cmd = [_chromium(), "--headless", "--no-sandbox", "--disable-gpu", "--disable-quic",
           "--no-first-run", "--disable-background-networking", "--disable-component-update",
           "--disable-sync", "--disable-extensions", f"--user-data-dir={tmp_path / 'profile'}",
           "--enable-logging=stderr", "--v=0", f"--screenshot={shot}", "--window-size=1200,2000",
           page.resolve().as_uri()]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=60, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-2000:]
    console = [line for line in proc.stderr.splitlines()
               if re.search(r"CONSOLE[:(]|Uncaught|ERROR:.*console", line)]
    return console, shot


def _colours(png: Path) -> int:
    from PIL import Image

    with Image.open(png) as img:
        return len(img.convert("RGB").getcolors(maxcolors=1 << 20) or [])


@pytest.mark.timeout(120)
def test_reports_render_in_chromium(derivatives, tmp_path):
    # The check must be able to fail: a page that logs an error is caught.
    bad = tmp_path / "bad.html"
    bad.write_text("<!DOCTYPE html><html><body><script>console.error('boom')</script>"
                   "</body></html>")
    console, _ = _render(bad, tmp_path)
    assert any("boom" in line for line in console)
    for page in (derivatives / "sub-01.html", derivatives / "group.html"):
        console, shot = _render(page, tmp_path)
        assert console == [], f"{page.name}: {console}"
        assert shot.stat().st_size > 10_000
        assert _colours(shot) > 50, f"{page.name}: the screenshot is (nearly) blank"
