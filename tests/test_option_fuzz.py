"""Fuzz every option: odd values on the command line or in ``--config-file`` never exit 1.

Hypothesis draws one to three options of ``spec2vol --help`` (all of them, read from the parser)
with edge values (nan, inf, negative, huge, empty, wrong type, non-ASCII, wrong encoding), given
on the command line or in a TOML file, on top of options that fit a one-participant dataset.
The participant level then runs to its end (or its refusal) in this process; the group level
stops once its options are checked (OUTPUT_DIR holds no derivatives). Whatever the values, the
exit code is a documented one and a failure is a single ``spec2vol: error:`` line: never a
traceback and never exit 1.
"""

from __future__ import annotations

import contextlib
import io
import math
import os
import tempfile
from pathlib import Path

import pytest
import tomli_w
from hypothesis import HealthCheck, Phase, event, given, settings
from hypothesis import strategies as st

from spec2vol_bids import cli
from spec2vol_bids.cli.parser import build_parser

DOCUMENTED = {0, 16, 18, 64, 65, 66, 73, 74}
BASE = ["--skip-bids-validation", "--discard-volumes", "2", "--context", "4", "--target-grid",
        "16", "16", "8", "--freq-bins", "16", "--omp-nthreads", "1", "--participant-label", "01"]
TEXTS = ["nan", "inf", "-inf", "-1", "0", "1", "3", "1e309", "99999999999", "", "é", "x" * 300,
         "sub-01", "true", "0x10", " 2 "]
TOML_VALUES = [math.nan, math.inf, -1, 0, 1, 3, 10**12, -(10**12), 2.5, "", "loud", "é", True,
               False, [], [1, 2], ["01"], {"a": 1}]
PATHS = ["missing", "a-file", "a-folder", "BIDS", "BIDS/sub-01"]


def _options():
    parser = build_parser()
    skip = {"help", "version", "config_file", "bids_dir", "output_dir", "analysis_level"}
    return [a for a in parser._actions if a.dest not in skip and a.option_strings]


OPTIONS = _options()


def _is_path(action) -> bool:
    return action.type is Path or action.dest in ("model",)


def _plausible(action) -> list:
    """Values the option accepts, so that drawn sets also reach deep into a run."""
    if action.choices:
        return list(action.choices)
    values = ["2", "16"] if action.type in (int, float) or getattr(action.type, "__name__", "") \
        .startswith(("_positive", "_nonnegative")) else ["01", "R128"]
    if action.default not in (None, False, [], 0):
        values.append(action.default)
    return values


@st.composite
def option_values(draw):
    action = draw(st.sampled_from(OPTIONS))
    flag = max(action.option_strings, key=len)
    text = st.one_of(st.sampled_from(TEXTS), st.sampled_from(_plausible(action)))
    if _is_path(action):
        values = [draw(st.sampled_from(PATHS))]
    elif action.nargs == 0:
        values = []
    elif isinstance(action.nargs, int):
        values = draw(st.lists(text, min_size=action.nargs - 1, max_size=action.nargs + 1))
    elif action.nargs in ("+", "*"):
        values = draw(st.lists(text, min_size=0, max_size=3))
    else:
        values = [draw(text)]
    values = [str(v) for v in values]
    plausible = [_typed(v) for v in _plausible(action)]
    if action.nargs not in (None, 0):
        plausible = [[v] * (action.nargs if isinstance(action.nargs, int) else 1) for v in plausible]
    toml = draw(st.one_of(st.sampled_from(TOML_VALUES), st.sampled_from(plausible))) \
        if not _is_path(action) else None
    return action, flag, values, toml


def _typed(value):
    for kind in (int, float):
        with contextlib.suppress(TypeError, ValueError):
            return kind(value)
    return value


@pytest.fixture(scope="module")
def one_subject(tmp_path_factory):
    from spec2vol_bids.simulate import simulate_dataset

    return simulate_dataset(tmp_path_factory.mktemp("fuzz") / "bids", subjects=1, volumes=20,
                            channels=8, grid=(16, 16, 8), seed=5)


@pytest.fixture()
def sandbox(monkeypatch):
    """Run main() in this process without leaving its traces: thread settings restored."""
    import torch

    threads = torch.get_num_threads()
    for var in ("OMP_NUM_THREADS", "MKL_NUM_THREADS", "OPENBLAS_NUM_THREADS"):
        monkeypatch.setenv(var, os.environ.get(var, "1"))
    yield
    torch.set_num_threads(threads)


def _resolve(value: str, root: Path, bids: Path) -> str:
    if value == "BIDS":
        return str(bids)
    if value.startswith("BIDS/"):
        return str(bids / value[5:])
    return str(root / value)


# No shrinking: each example runs a participant level of a second or so.
@settings(max_examples=40, deadline=None, derandomize=True, database=None,
          phases=[Phase.explicit, Phase.generate],
          suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow])
@given(level=st.sampled_from(["participant", "group"]), in_toml=st.booleans(),
       latin1=st.booleans(), drawn=st.lists(option_values(), min_size=1, max_size=3))
def test_no_option_value_exits_1_or_prints_a_traceback(one_subject, sandbox, level, in_toml, latin1,
                                                       drawn):
    with tempfile.TemporaryDirectory(prefix="spec2vol-optfuzz-") as tmp:
        root = Path(tmp)
        (root / "a-file").write_text("x")
        (root / "a-folder").mkdir()
        argv = [str(one_subject), str(root / "out"), level, *BASE]
        table = {}
        for action, flag, values, toml in drawn:
            if _is_path(action):
                argv += [flag, _resolve(values[0], root, one_subject)]
            elif in_toml:
                table[flag.lstrip("-")] = toml
            else:
                argv += [flag, *values]
        if table:
            config = root / "config.toml"
            text = tomli_w.dumps(table) if not any(isinstance(v, float) and math.isnan(v)
                                                   for v in table.values()) else \
                "\n".join(f"{k} = nan" if isinstance(v, float) and math.isnan(v) else
                          tomli_w.dumps({k: v}).strip() for k, v in table.items()) + "\n"
            config.write_bytes(text.encode("latin-1" if latin1 and "é" in text else "utf-8",
                                           errors="replace"))
            argv += ["--config-file", str(config)]
        stderr = io.StringIO()
        cwd = os.getcwd()
        os.chdir(root)  # relative paths and defaults land in the sandbox, never the repository
        try:
            with contextlib.redirect_stderr(stderr), contextlib.redirect_stdout(io.StringIO()):
                code = cli.main(argv)
        finally:
            os.chdir(cwd)
        text = stderr.getvalue()
        event(f"{level}: exit {code}")
        assert code in DOCUMENTED, f"exit {code} for {argv} {table}:\n{text}"
        assert "Traceback" not in text, f"{argv} {table}:\n{text}"
        if code:
            errors = [line for line in text.splitlines() if line.startswith("spec2vol: error:")]
            assert len(errors) == 1, f"{argv} {table}:\n{text}"


@pytest.mark.parametrize("extra, code, needle", [
    (["--target-grid", "99999", "16", "8"], 64, "--target-grid: must be at most 256 voxels"),
    (["--fmax", "1e300"], 65, "--fmax 1e+300 Hz is above the 125.0 Hz"),
    (["--seed", "99999999999999999999"], 64, "--seed: must be from 0 to 2**32 - 1"),
    (["--eeg-offset", "nan"], 64, "--eeg-offset: must be zero or a positive number"),
    (["--fmax", "inf"], 64, "--fmax: must be a positive number"),
    (["--context", "99999999999"], 65, "fewer than the 100000000002 a run needs"),
])
def test_extreme_values_are_refused_with_the_option_named(one_subject, sandbox, tmp_path, extra,
                                                          code, needle):
    base = BASE[:BASE.index("--freq-bins")] + BASE[BASE.index("--freq-bins") + 2:]
    argv = [str(one_subject), str(tmp_path / "out"), "participant", *base, *extra]
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr):
        assert cli.main(argv) == code, stderr.getvalue()
    errors = [line for line in stderr.getvalue().splitlines() if line.startswith("spec2vol: error:")]
    assert len(errors) == 1 and needle in errors[0], stderr.getvalue()


@pytest.mark.parametrize("content, code, needle", [
    (b'verbose = "loud"\n', 64, "option 'verbose': expected a count from 0 to 3"),
    ('task = "r\xe9st"\n'.encode("latin-1"), 64, "is not UTF-8 text"),
    (b"target-grid = [16, 16]\n", 64, "option 'target-grid': expected 3 values, got 2"),
    (b"folder", 66, "--config-file names a folder"),
])
def test_configuration_file_mistakes(one_subject, sandbox, tmp_path, content, code, needle):
    config = tmp_path / "config.toml"
    if content == b"folder":
        config.mkdir()
    else:
        config.write_bytes(content)
    stderr = io.StringIO()
    with contextlib.redirect_stderr(stderr):
        got = cli.main([str(one_subject), str(tmp_path / "out"), "participant", "--config-file",
                        str(config)])
    assert got == code, stderr.getvalue()
    assert needle in stderr.getvalue() and "Traceback" not in stderr.getvalue()
    assert not (tmp_path / "out").exists()  # refused before anything was created
