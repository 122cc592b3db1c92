"""The suite needs nothing outside the repository: a fresh clone in an empty folder runs it."""

from __future__ import annotations

import ast
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TEST_FILES = [p for p in sorted((ROOT / "tests").glob("*.py")) + sorted((ROOT / "tests").glob("*.sh"))
              if p.name != Path(__file__).name]

# Paths inside the container images, which test_containers.py checks in the recipes: they are
# strings the tests compare, never files the tests open.
IMAGE_PATHS = re.compile(r"^/(tmp/|home/\{|data$)")


def test_no_test_reads_outside_the_repository():
    offenders = []
    for path in TEST_FILES:
        text = path.read_text(encoding="utf-8")
        for pattern in (r"\.\./shared", r"shared/fixtures", r"SPEC2VOL_FIXTURES",
                        r"parents\[2\]", r"\.parent\.parent\.parent"):
            if re.search(pattern, text):
                offenders.append(f"{path.name}: {pattern}")
        if path.suffix != ".py":
            continue
        tree = ast.parse(text)
        # pieces of f-strings ("/eeg/..." after a folder) are not paths of their own
        pieces = {id(v) for node in ast.walk(tree) if isinstance(node, ast.JoinedStr) for v in node.values}
        for node in ast.walk(tree):
            if isinstance(node, ast.Constant) and isinstance(node.value, str) and id(node) not in pieces:
                value = node.value
                if (len(value) > 1 and value.startswith("/") and " " not in value
                        and not IMAGE_PATHS.match(value)):
                    offenders.append(f"{path.name}:{node.lineno}: absolute path {value!r}")
    assert not offenders, "tests must only read files inside the repository:\n" + "\n".join(offenders)


def test_every_fixture_is_in_the_repository():
    data = ROOT / "tests" / "data"
    assert (data / "README.md").is_file()
    assert (data / "eeg_rest_fmri" / "dataset_description.json").is_file()
    # the real headers and markers the NODDI tests work from
    for subject in ("32", "35", "36"):
        folder = data / "eeg_rest_fmri" / "derivatives" / f"sub-{subject}" / "eeg"
        assert (folder / f"sub-{subject}_task-rest_eeg.vmrk").stat().st_size > 100_000


def test_ci_runs_the_readme_test_command_from_a_copy():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    blocks = re.findall(r"```bash\n(.*?)\n```", readme, re.S)
    test_commands = [b.strip() for b in blocks if b.strip().endswith("python3 -m pytest")]
    assert len(test_commands) == 1, "README must give exactly one test command"
    ci = (ROOT / ".ci" / "run").read_text(encoding="utf-8")
    assert test_commands[0] in ci.splitlines()
    # run from a copy in an empty temporary folder, and pytest's "no tests" exit is a failure
    assert "mktemp -d" in ci and 'cd "$copy"' in ci
    assert re.search(r'"\$rc" -eq 5 \]; then\n[^\n]*\n\s*exit 1', ci)
