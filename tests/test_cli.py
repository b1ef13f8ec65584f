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
    assert result.stderr == ""  # no warning (torch warns "Failed to initialize NumPy" without numpy)


def test_numpy_is_a_dependency():
    from importlib.metadata import requires

    assert any(r.split(">")[0].split("=")[0].strip() == "numpy" for r in requires("kogpt-fast"))


def test_bad_flag_is_a_usage_message():
    result = run_cli(["--temperature", "hot", "--prompt", "x"])
    assert result.returncode == 2 and "argument --temperature: expected a number, got 'hot'" in result.stderr


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


def test_each_answer_is_checked_when_it_is_given(loaded, monkeypatch, capsys):
    """A bad temperature is refused at once and asked again (max_length is not asked first); so is max_length."""
    monkeypatch.setattr("builtins.input", Keyboard(
        "헌법", "0", "-1", "warm", "inf", "nan", "", "many", "0", "1", "100000", "12", EOFError()
    ))
    assert cli.main(["--device", "cpu"]) == 0
    out = capsys.readouterr().out
    assert out.count("temperature(0.8)> ") == 6 and out.count("max_length(128)> ") == 5
    assert out.count("error: temperature: expected a finite number above 0") == 4  # 0, -1, inf, nan
    assert out.count("error: temperature: expected a number, got 'warm'") == 1
    assert "error: max_length: expected a whole number, got 'many'" in out
    assert "error: max_length: expected a whole number of at least 1, got '0'" in out
    assert "the prompt has 1 tokens, so max_length must be above 1" in out
    assert "max_length 100000 is beyond this model's context of 512 tokens" in out
    assert out.count("prompt> ") == 2 and len(HANGUL.findall(out.split("12")[-1])) > 2


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
    real, calls = loaded.generate, []

    def failing_once(*args, **kwargs):
        calls.append(1)
        if len(calls) == 1:
            raise RuntimeError("the KV cache pool is full")
        return real(*args, **kwargs)

    monkeypatch.setattr(loaded, "generate", failing_once)
    monkeypatch.setattr("builtins.input", Keyboard("헌법", "", "", "헌법", "", "12", EOFError()))
    assert cli.main(["--device", "cpu"]) == 0
    captured = capsys.readouterr()
    assert "error: the KV cache pool is full" in captured.out and captured.out.count("prompt> ") == 3
    assert "Traceback" not in captured.out + captured.err


@pytest.mark.parametrize("args, message", [
    (["--prompt", ""], "--prompt is empty"),
    (["--prompt", "  "], "--prompt is empty"),
    (["--prompt", "x", "--temperature", "inf"], "argument --temperature: expected a finite number above 0, got 'inf'"),
    (["--prompt", "x", "--temperature", "0"], "argument --temperature: expected a finite number above 0, got '0'"),
    (["--prompt", "x", "--top-p", "1.5"], "argument --top-p: expected a number in (0, 1], got '1.5'"),
    (["--prompt", "x", "--max-new-tokens", "-1"], "argument --max-new-tokens: expected a whole number of at least 0"),
])
def test_bad_one_shot_values_are_usage_errors(capsys, args, message):
    with pytest.raises(SystemExit) as exit_:
        cli.main(args)
    assert exit_.value.code == 2 and message in capsys.readouterr().err


def run_main(args, capsys):
    code = cli.main(args)
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def test_cuda_without_cuda_is_a_message(capsys):
    import torch

    if torch.backends.cuda.is_built() and torch.cuda.device_count() > 0:
        pytest.skip("a CUDA device is present")
    code, out, err = run_main(["--device", "cuda", "--prompt", "국회는"], capsys)
    assert code == 1 and "error: device 'cuda' was requested, but" in err and "Traceback" not in err
    code, out, err = run_main(["--device", "cuda", "--prompt", "국회는", "--debug"], capsys)
    assert code == 1 and "Traceback" in err and "DeviceUnavailable" in err


def test_the_model_path_is_checked_before_the_tokenizer(tmp_path, capsys):
    import shutil

    from kogpt_fast.demo import demo_model_path

    code, _, err = run_main(["--model", str(tmp_path / "nowhere"), "--prompt", "x"], capsys)
    assert code == 1 and f"no model directory at {tmp_path / 'nowhere'}" in err
    (tmp_path / "config.json").write_text("{broken")  # and no tokenizer either: the config is what is wrong
    code, _, err = run_main(["--model", str(tmp_path), "--prompt", "x"], capsys)
    assert code == 1 and f"{tmp_path / 'config.json'} is not valid JSON" in err and "tokenizer" not in err
    shutil.copy(demo_model_path() / "config.json", tmp_path)
    code, _, err = run_main(["--model", str(tmp_path), "--prompt", "x"], capsys)
    assert code == 1 and f"no weights in {tmp_path}: looked for model.safetensors" in err
    shutil.copy(demo_model_path() / "model.safetensors", tmp_path)
    code, _, err = run_main(["--model", str(tmp_path), "--prompt", "x"], capsys)
    assert code == 1 and f"no tokenizer in directory {tmp_path}: looked for tokenizer.json" in err
    (tmp_path / "config.json").write_text('{"model_type": "llama"}')
    code, _, err = run_main(["--model", str(tmp_path), "--prompt", "x"], capsys)
    assert code == 1 and f"{tmp_path / 'config.json'}: model_type='llama' is not supported" in err


def test_a_hub_id_that_is_not_in_the_cache_says_what_to_download(tmp_path, monkeypatch, capsys):
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path))
    code, _, err = run_main(["--model", "kakaobrain/kogpt", "--revision", "KoGPT6B-ryan1.5b"], capsys)
    assert code == 1 and "Traceback" not in err
    assert f"there is no {tmp_path / 'models--kakaobrain--kogpt'}" in err
    assert err.rstrip().endswith("fetch it with:  hf download kakaobrain/kogpt --revision KoGPT6B-ryan1.5b")


def test_the_model_cards_command_runs_from_the_hub_cache(tmp_path):
    """`--model kakaobrain/kogpt --revision ...` as the model card's CLI takes it, with the cache found through
    HF_HOME (no HF_HUB_CACHE), as HF finds it."""
    import os

    from hub_fixtures import build_fake_hub_cache

    build_fake_hub_cache(tmp_path / "hub")
    env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_CACHE", "HUGGINGFACE_HUB_CACHE")}
    result = subprocess.run(
        [sys.executable, "-m", "kogpt_fast", "--model", "kakaobrain/kogpt", "--revision", "KoGPT6B-ryan1.5b",
         "--device", "cpu", "--prompt", "대한민국의 주권은", "--greedy", "--max-new-tokens", "12", "--debug"],
        capture_output=True, text=True, timeout=300, env={**env, "HF_HOME": str(tmp_path)})
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("대한민국의 주권은") and len(HANGUL.findall(result.stdout)) > 6
    assert f"loaded {tmp_path}/hub/models--kakaobrain--kogpt/snapshots/bbbbbbbb" in result.stderr


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
