"""The command line: options, configuration files and exit codes for usage mistakes."""

import subprocess
import sys

import pytest

from spec2vol_bids import __version__
from spec2vol_bids.cli import main
from spec2vol_bids.cli.parser import parse_args


def run_cli(*args, cwd=None):
    """Run ``python -m spec2vol_bids`` as a user would; return (code, stdout, stderr)."""
    proc = subprocess.run([sys.executable, "-m", "spec2vol_bids", *map(str, args)],
                          capture_output=True, text=True, cwd=cwd, timeout=300)
    return proc.returncode, proc.stdout, proc.stderr


def assert_one_line_error(stderr: str, *needles: str) -> None:
    lines = [line for line in stderr.splitlines() if line.startswith("spec2vol: error")]
    assert len(lines) == 1, stderr
    assert "Traceback" not in stderr
    for needle in needles:
        assert needle in lines[0], lines[0]


def test_version_through_module_and_console_script():
    code, out, _ = run_cli("--version")
    assert code == 0 and out.strip() == f"spec2vol {__version__}"
    proc = subprocess.run(["spec2vol", "--version"], capture_output=True, text=True)
    assert proc.returncode == 0 and __version__ in proc.stdout


@pytest.mark.parametrize("args, needle", [
    (["participant", "--bogus"], "--bogus"),
    (["everything"], "analysis_level"),
    (["group", "--model", "resnet"], "--model"),
    (["group", "--model", "ridge", "--protocol", "published"], "--protocol published"),
    (["group", "--model", "hrf-ridge", "--eeg-normalisation", "minmax"], "--eeg-normalisation minmax"),
    (["participant", "--participant-label", "../01"], "--participant-label"),
    (["participant", "--participant-label", "sub-01/x"], "--participant-label"),
    (["group", "--epochs", "0"], "--epochs"),
    (["group", "--split", "fixed"], "--test-subjects"),
    (["group", "--test-subjects", "01"], "--test-subjects is for --split fixed"),
    (["participant", "--freq-bins", "10", "--fmax", "40"], "--fmax"),
])
def test_usage_mistakes_exit_64_with_one_line(tmp_path, args, needle):
    code, _, err = run_cli(tmp_path / "bids", tmp_path / "out", *args)
    assert code == 64
    assert_one_line_error(err, needle)
    assert not (tmp_path / "out").exists()


def test_labels_accept_and_strip_prefixes(tmp_path):
    opts = parse_args([str(tmp_path), str(tmp_path / "o"), "participant",
                       "--participant-label", "sub-02", "01", "02", "--session-label", "ses-pre"])
    assert opts.inputs.participant_label == ("01", "02")
    assert opts.inputs.session_label == ("pre",)
    assert opts.execution.work_dir == (tmp_path / ".o_work").absolute()


def test_config_file_sets_options_and_command_line_wins(tmp_path):
    cfg = tmp_path / "spec2vol.toml"
    cfg.write_text('participant-label = ["sub-03"]\nepochs = 3\nmodel_config = "tiny"\n'
                   'skip-bids-validation = true\n')
    opts = parse_args([str(tmp_path), str(tmp_path / "o"), "group", "--config-file", str(cfg),
                       "--epochs", "5"])
    assert opts.inputs.participant_label == ("03",)
    assert opts.training.epochs == 5
    assert opts.training.size == "tiny"
    assert opts.inputs.skip_bids_validation is True


def test_one_config_file_for_both_levels_names_the_groups_model(tmp_path):
    """``model = "ridge"`` is the group's model; the participant level applies a model file
    only when one is named (in the file or on the command line)."""
    cfg = tmp_path / "study.toml"
    cfg.write_text('model = "ridge"\n')
    args = [str(tmp_path), str(tmp_path / "o")]
    assert parse_args([*args, "group", "--config-file", str(cfg)]).training.model == "ridge"
    assert parse_args([*args, "participant", "--config-file", str(cfg)]).participant.model_path is None
    cfg.write_text(f'model = "{tmp_path / "model.pt"}"\n')
    assert (parse_args([*args, "participant", "--config-file", str(cfg)]).participant.model_path
            == tmp_path / "model.pt")


@pytest.mark.parametrize("content, needle", [
    ("learning_rate_schedule = 3\n", "learning_rate_schedule"),
    ("epochs = 'many'\n", "epochs"),
    ("model-config = 'huge'\n", "model-config"),
    ("this is not toml\n", "TOML"),
])
def test_bad_config_file_is_a_usage_error(tmp_path, capsys, content, needle):
    cfg = tmp_path / "bad.toml"
    cfg.write_text(content)
    code = main([str(tmp_path), str(tmp_path / "o"), "group", "--config-file", str(cfg)])
    assert code == 64
    err = capsys.readouterr().err
    assert_one_line_error(err, needle, str(cfg))


def test_missing_config_file_exits_66(tmp_path, capsys):
    code = main([str(tmp_path), str(tmp_path / "o"), "group", "--config-file", str(tmp_path / "no.toml")])
    assert code == 66
    assert_one_line_error(capsys.readouterr().err, "no.toml")
