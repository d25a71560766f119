"""What the trainers print: their own lines by default, and a user's
mistake as one line with exit status 2."""

import json
import os
import subprocess
import sys

import pytest

_ROOT = os.path.join(os.path.dirname(__file__), "..")


def _run(*args, timeout=300):
    env = dict(os.environ)
    env.pop("TF_CPP_MIN_LOG_LEVEL", None)
    return subprocess.run([sys.executable, "-m", *args], cwd=_ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout,
                          check=False)


def _one_error_line(result):
    assert result.returncode == 2, (result.stdout[-2000:],
                                    result.stderr[-2000:])
    lines = [line for line in result.stderr.splitlines() if line.strip()]
    assert len(lines) == 1, result.stderr[-3000:]
    assert lines[0].startswith("error: ")
    return lines[0]


def test_unknown_config_field_names_it_and_the_nearest_one(tmp_path):
    line = _one_error_line(_run(
        "trainers.lm", "--config=configs/lm/default.py",
        f"--workdir={tmp_path}", "--config.model.num_expert=8"))
    assert "--config.model.num_expert" in line
    assert "did you mean 'num_experts'" in line


def test_unknown_config_section_names_it(tmp_path):
    line = _one_error_line(_run(
        "trainers.nmt", "--config=configs/nmt/default.py",
        f"--workdir={tmp_path}", "--config.modle.d_model=8"))
    assert "'modle'" in line and "did you mean 'model'" in line


def test_missing_data_file_is_one_line(tmp_path):
    missing = str(tmp_path / "no_such.txt")
    line = _one_error_line(_run(
        "trainers.lm", "--config=configs/lm/default.py",
        f"--workdir={tmp_path / 'work'}", "--config.data.source=text",
        f"--config.data.train_path={missing}",
        f"--config.data.valid_path={missing}",
        f"--config.data.test_path={missing}"))
    assert missing in line and "config.data.train_path" in line


def test_workdir_of_another_model_is_one_line(tmp_path):
    with open(tmp_path / "model.json", "w", encoding="utf-8") as f:
        json.dump({"model": "another"}, f)
    line = _one_error_line(_run(
        "trainers.lm", "--config=configs/lm/default.py",
        f"--workdir={tmp_path}"))
    assert "holds a different model" in line


@pytest.mark.parametrize("verbose", [False, True])
def test_default_output_is_the_jobs_own(tmp_path, verbose):
    args = ["trainers.quickstart", "--epochs=1", f"--workdir={tmp_path}",
            "--num_experts=4"]
    if verbose:
        args.append("--verbosity=0")
    result = _run(*args)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "final epoch" in result.stdout
    # TensorFlow's own log lines: C++ (I0000/W0000/E0000 ...) and Python
    # INFO/WARNING lines.
    tensorflow_lines = [
        line for line in result.stderr.splitlines()
        if line[:1] in "IWE" and line[1:5].isdigit()
        or "oneDNN" in line or "cuda" in line.lower()]
    if verbose:
        assert tensorflow_lines, result.stderr[-2000:]
    else:
        assert not tensorflow_lines, tensorflow_lines[:5]
