"""The benchmark suite on the CPU: the smoke run's results.json and plots, and the compiled-PyTorch baseline's
greedy parity with HF eager (fp32, without torch.compile)."""
from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from hf_reference import hf_greedy, random_hf_model

REPO = Path(__file__).resolve().parent.parent
if str(REPO) not in sys.path:
    sys.path.insert(0, str(REPO))  # bench/ is run from the checkout, not installed

from bench import plots, run  # noqa: E402
from bench.compiled_baseline import GPTJ, StaticCacheGenerator  # noqa: E402
from bench.timing import MAX_COPIES, copies_for  # noqa: E402

HAS_TRANSFORMERS = importlib.util.find_spec("transformers") is not None
REFERENCE_OPS = {"linear", "linear_gelu", "linear_split_gelu", "linear_concat_residual",
                 "layer_norm_linear_split_gelu", "prefill_attention", "extend_attention",
                 "decode_attention", "write_kv_cache", "layer_norm"}


@pytest.fixture(scope="module")
def smoke(tmp_path_factory):
    """`python bench/run.py --quick --device cpu --out DIR`, as a user runs it: (DIR, results.json, stdout)."""
    out = tmp_path_factory.mktemp("bench")
    # Without the Triton interpreter: interpreted kernels would turn seconds into minutes.
    env = {k: v for k, v in os.environ.items() if k not in ("TRITON_INTERPRET", "KOGPT_BACKEND")}
    proc = subprocess.run(
        [sys.executable, str(REPO / "bench" / "run.py"), "--quick", "--device", "cpu", "--out", str(out)],
        capture_output=True, text=True, timeout=300, env=env, cwd=REPO,
    )
    assert proc.returncode == 0, f"stdout:\n{proc.stdout[-4000:]}\nstderr:\n{proc.stderr[-4000:]}"
    return out, json.loads((out / "results.json").read_text(encoding="utf-8")), proc.stdout


def _figure(record: dict, name: str, unit: str) -> float:
    figure = record[name]
    assert figure["unit"] == unit, (name, figure)
    assert isinstance(figure["value"], float), (name, figure)
    return figure["value"]


def test_smoke_run_header(smoke):
    _, data, stdout = smoke
    assert data["finished"] is True
    env = data["env"]
    for key in ("device", "device_name", "driver", "torch", "triton", "transformers", "git_commit", "python"):
        assert key in env
    assert env["device"] == "cpu" and env["torch"] == torch.__version__
    assert data["settings"]["quick"] is True and data["settings"]["dtype"] == "float32"
    assert data["backends"]["torch"] == {"runnable": True, "reason": None}
    for name, status in data["backends"].items():  # a backend that cannot run says why
        assert status["runnable"] or status["reason"], name
    assert _figure(data["peaks"], "copy_bandwidth", "TB/s") > 0
    assert _figure(data["peaks"], "matmul_peak", "TFLOP/s") > 0
    assert "per-op" in stdout and "end to end" in stdout  # the terminal table


def test_smoke_run_ops(smoke):
    _, data, _ = smoke
    measured = [r for r in data["ops"] if "time" in r]
    assert {r["op"] for r in measured if r["impl"] == "torch"} == REFERENCE_OPS
    failed = [r for r in data["ops"] if "error" in r and r["impl"] == "torch" or r["is_baseline"] and "error" in r]
    assert not failed, failed
    for r in measured:
        assert _figure(r, "time", "us") > 0
        _figure(r, "bandwidth", "TB/s")
        _figure(r, "throughput", "TFLOP/s")
        for name in ("fraction_of_copy_bandwidth", "fraction_of_matmul_peak", "fraction_of_roofline"):
            _figure(r, name, "fraction")
        if not r["is_baseline"]:  # each backend's figure sits next to its baseline's, measured in the same run
            assert r["baseline"]["impl"] and _figure(r["baseline"], "time", "us") > 0
            _figure(r, "speedup_vs_baseline", "x")
    labels = {r["label"] for r in measured}
    assert all({"baseline", "torch"} <= {"baseline" if r["is_baseline"] else r["impl"] for r in measured
                                         if r["label"] == label} for label in labels)


def test_smoke_run_end_to_end(smoke):
    _, data, _ = smoke
    figures = [r for r in data["e2e"] if "value" in r]
    assert not [r for r in data["e2e"] if "error" in r]
    systems = {r["system"] for r in figures}
    expected = {"kogpt-fast[torch]", "pytorch-static"} | ({"hf-eager"} if HAS_TRANSFORMERS else set())
    assert expected <= systems
    units = {r["metric"]: r["unit"] for r in figures}
    assert units["time_to_first_token"] == "ms" and units["decode_ms_per_token"] == "ms/token"
    assert units["tokens_per_s"] == "tokens/s"
    for r in figures:
        assert r["value"] > 0
        if r["system"].startswith("kogpt-fast"):
            assert "pytorch-static" in r["baselines"] and (not HAS_TRANSFORMERS or "hf-eager" in r["baselines"])
    # The batch-1 decode figure comes with the floor of this run: the weights read once at the measured copy rate.
    floor = data["e2e_info"]["floor"]
    assert floor["floor_ms_per_token"] == pytest.approx(
        floor["weight_bytes_per_token"] / floor["copy_bytes_per_s"] * 1e3)
    assert floor["copy_bytes_per_s"] == pytest.approx(data["peaks"]["copy_bandwidth"]["value"] * 1e12)
    for r in figures:
        if r["metric"] == "decode_ms_per_token":
            own = r["system_info"].get("weight_bytes_per_token")  # a quantized system's own bytes
            expected = floor["floor_ms_per_token"] if own is None else own / floor["copy_bytes_per_s"] * 1e3
            assert r["floor"]["value"] == pytest.approx(expected)
            assert r["fraction_of_floor"]["value"] == pytest.approx(expected / r["value"])
    # int8 and fp8 weights on the CPU's backend: half the bytes of the fp32 weights' floor at most, and their
    # figure next to the dense one of the same run
    quantized = {r["system"]: r for r in figures
                 if r["metric"] == "decode_ms_per_token" and r["system_info"].get("quantize")}
    assert set(quantized) == {"kogpt-fast[torch]+int8", "kogpt-fast[torch]+fp8"}
    for r in quantized.values():
        assert r["floor"]["value"] < 0.5 * floor["floor_ms_per_token"]
        assert r["vs_dense_weights"]["system"] == "kogpt-fast[torch]" and r["vs_dense_weights"]["value"] > 0
    skipped = {s["system"] for s in data["e2e_info"]["skipped_systems"]}
    assert "hf-sdpa" in systems | skipped  # run, or skipped with the reason (transformers 5.x GPT-J has no sdpa)
    if HAS_TRANSFORMERS:  # the same weights reached both: the torch backend is HF eager's equal in fp32
        for a in data["e2e_info"]["token_agreement"]:
            if a["system"] == "kogpt-fast[torch]":
                assert a["reference"] == "hf-eager" and a["common_prefix_tokens"] == a["new_tokens"], a


def test_smoke_run_plots(smoke):
    out, data, _ = smoke
    try:
        import matplotlib  # noqa: F401
    except ImportError:
        assert data["plots"]["skipped"] == plots.MISSING
        pytest.skip("matplotlib is not installed, so the run skipped its plots (pip install matplotlib)")
    assert isinstance(data["plots"], list) and data["plots"], data["plots"]
    for name in data["plots"]:
        assert name.endswith(".png") and (out / name).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_weight_bytes_per_token_skip_the_embedding_and_count_shared_tensors_once():
    from bench import e2e

    wte, head = torch.zeros(10, 4), torch.zeros(10, 4, dtype=torch.float16)
    layer = torch.zeros(3, 4)
    weights = {"transformer.wte.weight": wte, "transformer.h.0.attn.q_proj.weight": layer, "lm_head.weight": head}
    assert e2e.weight_bytes_per_token(weights) == 3 * 4 * 4 + 10 * 4 * 2
    tied = {**weights, "lm_head.weight": wte}  # a tied lm_head reads the whole table, once
    assert e2e.weight_bytes_per_token(tied) == 3 * 4 * 4 + 10 * 4 * 4
    records = [{"metric": "decode_ms_per_token", "value": 8.0, "params": {"batch": 1}},
               {"metric": "decode_ms_per_token", "value": 8.0, "params": {"batch": 4}}]
    info = e2e.attach_floor(records, weights, copy_bytes_per_s=128e3)  # 128 bytes at 128 kB/s: 1 ms
    assert info["floor_ms_per_token"] == pytest.approx(1.0)
    assert records[0]["fraction_of_floor"]["value"] == pytest.approx(1 / 8)
    assert "floor" not in records[1]  # the floor is a batch-1 figure
    assert e2e.attach_floor(records, weights, None) is None


def test_kernel_backends_get_a_prefill_path_variant_for_ttft_only():
    from bench import e2e
    from kogpt_fast.config import GPTJConfig

    names = [s.name for s in e2e.system_specs(GPTJConfig(), {}, ["torch", "triton", "cuda"], None, False)]
    assert "kogpt-fast[cuda]+torch-prefill" in names and "kogpt-fast[triton]+torch-prefill" not in names
    names = [s.name for s in e2e.system_specs(GPTJConfig(), {}, ["torch"], None, False)]
    assert not any("torch-prefill" in n for n in names)
    names = [s.name for s in e2e.system_specs(GPTJConfig(), {}, ["triton"], {"kogpt"}, False)]
    assert names == ["kogpt-fast[triton]", "kogpt-fast[triton]+torch-prefill", "kogpt-fast[triton]+int8",
                     "kogpt-fast[triton]+fp8"]


def test_report_of_an_earlier_run(smoke, capsys):
    out, _, _ = smoke
    assert run.main(["--report", str(out / "results.json"), "--summary"]) == 0
    summary = capsys.readouterr().out
    assert "measured peaks" in summary and "decode_ms_per_token" in summary


def test_plots_are_skipped_with_a_note_without_matplotlib(smoke, monkeypatch, tmp_path):
    _, data, _ = smoke
    monkeypatch.setitem(sys.modules, "matplotlib", None)  # import matplotlib now raises ImportError
    assert plots.make_plots(data, tmp_path) == {"skipped": plots.MISSING}
    assert not list(tmp_path.iterdir())


def test_help_documents_the_options(capsys):
    with pytest.raises(SystemExit) as exit_info:
        run.parse_args(["--help"])
    assert exit_info.value.code == 0
    text = capsys.readouterr().out
    for option in ("--quick", "--device", "--out", "--model", "--backends", "--budget", "--report"):
        assert option in text


def test_rotated_copies_exceed_the_cache():
    cpu = torch.device("cpu")
    assert copies_for(2**30, cpu) == 1
    assert copies_for(2**20, cpu) == MAX_COPIES
    n = copies_for(32 * 2**20, cpu)
    assert 1 < n < MAX_COPIES and n * 32 * 2**20 >= 4 * 32 * 2**20


CONFIGS = {
    "kogpt_heads": dict(n_embd=512, n_head=2, rotary_dim=64, n_layer=2),
    "small_heads_tied": dict(n_embd=96, n_head=3, rotary_dim=16, n_layer=3, n_inner=200, tie_word_embeddings=True),
    "full_rotary": dict(n_embd=128, n_head=4, rotary_dim=32, n_layer=2, activation_function="gelu_pytorch_tanh"),
}


@pytest.fixture
def one_thread():
    """Tiny models run faster on one thread, and much faster on a machine whose cores are busy (CI)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.mark.skipif(not HAS_TRANSFORMERS, reason="transformers (the test extra) is the reference")
@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_compiled_baseline_gives_hf_greedy_tokens(name, one_thread):
    hf = random_hf_model(seed=len(name), **CONFIGS[name])
    eos = hf.config.eos_token_id
    generator = StaticCacheGenerator(GPTJ.from_state_dict(hf.config, hf.state_dict()), compile=False,
                                     suppress_token_id=eos)
    for prompt_len in (1, 7, 33):
        ids = torch.randint(2, hf.config.vocab_size, (3, prompt_len), generator=torch.Generator().manual_seed(prompt_len))
        # The benchmark makes every system generate exactly n tokens: HF's min_new_tokens=n suppresses eos.
        expected = hf_greedy(hf, ids, torch.ones_like(ids), max_new_tokens=12, min_new_tokens=12)
        got = generator.generate(ids, 12)
        assert len(set(expected[:, prompt_len:].flatten().tolist())) > 2, "reference output is degenerate"
        assert torch.equal(got, expected), (expected[:, prompt_len:].tolist(), got[:, prompt_len:].tolist())


def test_kogpt_systems_share_one_model_and_switch_it():
    """The kogpt-fast systems of a run share one model (one copy of the fused weights); each selects its backend
    and prefill path before it runs, dropping the decode graphs of the previous one."""
    from bench import e2e

    weights = e2e.random_weights(run.TINY, torch.device("cpu"), torch.float32)
    shared: dict = {}
    first = e2e.KoGPTSystem(run.TINY, weights, "torch", shared=shared)
    second = e2e.KoGPTSystem(run.TINY, weights, "torch", "torch", shared=shared)
    assert first.model is second.model and second.kinds == {"ttft"}
    ids = torch.randint(2, run.TINY.vocab_size, (1, 5), generator=torch.Generator().manual_seed(0))
    out = first.generate(ids, 4)
    assert first.model.prefill_path == "kernel"
    first.model._decode_steps[99] = "a graph of the other backend"
    assert torch.equal(second.generate(ids, 4), out)  # on the torch backend the prefill path changes nothing
    assert second.model.prefill_path == "torch" and 99 not in second.model._decode_steps
    second.release()
    assert second.model.kv_cache is None and second.model._decode_steps == {}


def run_cpu_decode(out: Path, *args: str) -> dict:
    """bench/cpu_decode.py at its smallest (prompt 5, 3 new tokens, one repeat, one thread) -> its JSON."""
    cmd = [sys.executable, str(REPO / "bench" / "cpu_decode.py"), "--prompts", "5", "--new", "3", "--repeats", "1",
           "--threads", "1", "--out", str(out), *args]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return {"stdout": done.stdout, **json.loads((out / "cpu_decode.json").read_text())}


def test_cpu_decode_benchmark_smoke(tmp_path):
    """bench/cpu_decode.py end to end at its smallest (CTranslate2, an optional baseline, left out): both systems
    give the same greedy tokens, and the table and JSON hold every case."""
    result = run_cpu_decode(tmp_path, "--batches", "1,2", "--systems", "kogpt-fast[torch],hf-eager")
    assert "| 2 | 5 |" in result["stdout"]
    cases = result["cases"]
    assert [(c["batch"], c["prompt"]) for c in cases] == [(1, 5), (2, 5)]
    for case in cases:
        rows = case["systems"]
        assert set(rows) == {"kogpt-fast[torch]", "hf-eager"}
        assert all(r["same_tokens_as_kogpt-fast[torch]"] for r in rows.values())
        assert all(isinstance(r["decode_ms_per_token"], float) and r["request_s"] > 0 for r in rows.values())


def test_cpu_decode_ctranslate2_runs_in_its_own_process_and_agrees(tmp_path):
    """The optional CTranslate2 baseline, where it is installed: its worker process answers over the pipe with the
    same greedy tokens as kogpt-fast, and exits when the benchmark closes it."""
    pytest.importorskip("ctranslate2", reason="ctranslate2 (an optional benchmark baseline) is not installed")
    result = run_cpu_decode(tmp_path, "--batches", "2", "--systems", "kogpt-fast[torch],ctranslate2")
    assert result["info"]["ctranslate2"]["process"].startswith("its own")
    rows = result["cases"][0]["systems"]
    assert set(rows) == {"kogpt-fast[torch]", "ctranslate2"}
    assert rows["ctranslate2"]["same_tokens_as_kogpt-fast[torch]"]
