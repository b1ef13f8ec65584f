"""The CLI: KoGPT's prompt loop on the demo model, one-shot mode, bad input, interrupts."""
from __future__ import annotations

import re
import subprocess
import sys

import pytest

from kogpt_fast import cli

HANGUL = re.compile(r"[\uac00-\ud7a3]")


def run_cli(args, stdin=""):
    return subprocess.run(
        [sys.executable, "-m", "kogpt_fast", *args], input=stdin, capture_output=True, text=True, timeout=300
    )


def test_prompt_loop_on_stdin_prints_korean_and_exits_0():
    # An empty prompt asks again; defaults for temperature and max_length; then end of input.
    result = run_cli(["--device", "cpu"], stdin="\n대한민국은\n\n\n국회는\n0.5\n40\n")
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("prompt> ") == 4  # empty, 대한민국은, 국회는, then end of input
    assert "temperature(0.8)> " in result.stdout and "max_length(128)> " in result.stdout
    generated = result.stdout.split("max_length(128)> ")[1]
    assert generated.startswith("대한민국은") and len(HANGUL.findall(generated)) > 10
    assert "Traceback" not in result.stderr


def test_one_shot_greedy():
    result = run_cli(["--device", "cpu", "--prompt", "대한민국의 주권은", "--greedy", "--max-new-tokens", "20"])
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("대한민국의 주권은") and len(HANGUL.findall(result.stdout)) > 10


def test_bad_flag_is_a_usage_message():
    result = run_cli(["--temperature", "hot", "--prompt", "x"])
    assert result.returncode == 2 and "invalid float value: 'hot'" in result.stderr


def test_missing_model_is_a_message_not_a_traceback(tmp_path):
    result = run_cli(["--device", "cpu", "--model", str(tmp_path / "nowhere")])
    assert result.returncode == 1
    assert "nowhere" in result.stderr and "Traceback" not in result.stderr


class Keyboard:
    """Feeds answers to input(); raises what it is given (EOFError, KeyboardInterrupt) in their place."""

    def __init__(self, *answers):
        self.answers = list(answers)

    def __call__(self, label):
        print(label, end="")
        answer = self.answers.pop(0)
        if isinstance(answer, BaseException):
            raise answer
        return answer


@pytest.fixture
def loaded(monkeypatch):
    tokenizer, model = cli.load(cli.build_parser().parse_args(["--device", "cpu"]))
    monkeypatch.setattr(cli, "load", lambda args: (tokenizer, model))
    return model


def test_bad_values_at_the_prompts_are_refused_and_the_loop_goes_on(loaded, monkeypatch, capsys):
    monkeypatch.setattr("builtins.input", Keyboard(
        "헌법", "0", "", "헌법", "-1", "", "헌법", "warm", "", "헌법", "0.8", "many", "헌법", "", "12", EOFError()
    ))
    assert cli.main(["--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert out.count("error: temperature must be positive") == 2
    assert out.count("error: temperature must be a number and max_length an integer") == 2
    assert out.count("prompt> ") == 6 and len(HANGUL.findall(out.split("12")[-1])) > 2


def test_ctrl_c_during_generation_returns_to_the_prompt(loaded, monkeypatch, capsys):
    real = loaded.generate
    calls = []

    def interrupted_once(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise KeyboardInterrupt
        return real(*args, **kwargs)

    monkeypatch.setattr(loaded, "generate", interrupted_once)
    monkeypatch.setattr("builtins.input", Keyboard("헌법", "", "", "헌법", "", "10", KeyboardInterrupt()))
    assert cli.main(["--device", "cpu"]) == 0  # Ctrl-C at the prompt exits cleanly
    out = capsys.readouterr().out
    assert "(interrupted)" in out and out.count("prompt> ") == 3 and len(calls) == 2


def test_generation_error_is_reported_and_the_loop_goes_on(loaded, monkeypatch, capsys):
    monkeypatch.setattr("builtins.input", Keyboard("헌법", "", "100000", "헌법", "", "12", EOFError()))
    assert cli.main(["--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert "error: " in out and "n_positions" in out and out.count("prompt> ") == 3


def test_demo_script_passes_its_arguments_to_the_cli_not_to_pip(tmp_path):
    """scripts/demo.sh ARGS: setup_env.sh gets no extras (a bare `source` would hand it ARGS), the CLI gets ARGS.
    Run against a stand-in setup_env.sh and python that record what they receive."""
    import shutil
    from pathlib import Path

    repo = Path(__file__).resolve().parent.parent
    scripts = tmp_path / "scripts"
    scripts.mkdir()
    shutil.copy(repo / "scripts" / "demo.sh", scripts / "demo.sh")
    record = tmp_path / "record.txt"
    (scripts / "setup_env.sh").write_text(f'printf "setup [%s] %s\\n" "$1" "$#" >> {record}\n', encoding="utf-8")
    fake_bin = tmp_path / "bin"
    fake_bin.mkdir()
    (fake_bin / "python").write_text(f'#!/usr/bin/env bash\nprintf "python %s\\n" "$*" >> {record}\n',
                                     encoding="utf-8")
    (fake_bin / "python").chmod(0o755)
    env = {"PATH": f"{fake_bin}:/usr/bin:/bin"}
    result = subprocess.run(["bash", str(scripts / "demo.sh"), "--device", "cpu", "--prompt", "국회는"],
                            capture_output=True, text=True, env=env, timeout=60)
    assert result.returncode == 0, result.stderr
    assert record.read_text(encoding="utf-8").splitlines() == [
        "setup [] 1", "python -m kogpt_fast --device cpu --prompt 국회는"]
