"""The README's Python section is the KoGPT model card's snippet with only its import line changed, and it runs:
verbatim but for `.to('cpu')`, in a subprocess whose HF_HUB_CACHE is a fake cache made from the demo checkpoint."""
from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

from hub_fixtures import build_fake_hub_cache

README = Path(__file__).resolve().parent.parent / "README.md"

# The model card's Python example (huggingface.co/kakaobrain/kogpt, README.md "### python"), verbatim: the trailing
# space after the import and the blank line's two spaces are the card's.
MODEL_CARD = """\
import torch
from transformers import AutoTokenizer, AutoModelForCausalLM 

tokenizer = AutoTokenizer.from_pretrained(
  'kakaobrain/kogpt', revision='KoGPT6B-ryan1.5b-float16',  # or float32 version: revision=KoGPT6B-ryan1.5b
  bos_token='[BOS]', eos_token='[EOS]', unk_token='[UNK]', pad_token='[PAD]', mask_token='[MASK]'
)
model = AutoModelForCausalLM.from_pretrained(
  'kakaobrain/kogpt', revision='KoGPT6B-ryan1.5b-float16',  # or float32 version: revision=KoGPT6B-ryan1.5b
  pad_token_id=tokenizer.eos_token_id,
  torch_dtype='auto', low_cpu_mem_usage=True
).to(device='cuda', non_blocking=True)
_ = model.eval()

prompt = '인간처럼 생각하고, 행동하는 \\'지능\\'을 통해 인류가 이제까지 풀지 못했던'
with torch.no_grad():
  tokens = tokenizer.encode(prompt, return_tensors='pt').to(device='cuda', non_blocking=True)
  gen_tokens = model.generate(tokens, do_sample=True, temperature=0.8, max_length=64)
  generated = tokenizer.batch_decode(gen_tokens)[0]
  
print(generated)  # print: 인간처럼 생각하고, 행동하는 '지능'을 통해 인류가 이제까지 풀지 못했던 문제의 해답을 찾을 수 있을 것이다. 과학기술이 고도로 발달한 21세기를 살아갈 우리 아이들에게 가장 필요한 것은 사고력 훈련이다. 사고력 훈련을 통해, 세상
"""
CARD_IMPORT = "from transformers import AutoTokenizer, AutoModelForCausalLM "
OUR_IMPORT = "from kogpt_fast import KoGPTTokenizer as AutoTokenizer, KoGPTForCausalLM as AutoModelForCausalLM"


def readme_snippet() -> str:
    return re.search(r"```python\n(.*?)```", README.read_text(encoding="utf-8"), re.S).group(1)


def test_readme_shows_the_model_card_snippet_with_only_the_import_changed():
    ours, card = readme_snippet().splitlines(), MODEL_CARD.splitlines()
    assert len(ours) == len(card)
    changed = [(a, b) for a, b in zip(card, ours) if a != b]
    assert changed == [(CARD_IMPORT, OUR_IMPORT)]


def test_model_card_snippet_runs_from_the_hub_cache(tmp_path):
    code = readme_snippet()
    assert code.count("device='cuda'") == 2
    code = code.replace("device='cuda'", "device='cpu'")
    env = {**os.environ, "HF_HUB_CACHE": str(build_fake_hub_cache(tmp_path / "hub")),
           # a download would fail here: no proxy listens on port 9
           "HTTPS_PROXY": "http://127.0.0.1:9", "HTTP_PROXY": "http://127.0.0.1:9"}
    env.pop("HF_HUB_OFFLINE", None)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stderr == ""  # no warning either (NumPy, deprecations)
    prompt = "인간처럼 생각하고, 행동하는 '지능'을 통해 인류가 이제까지 풀지 못했던"
    assert result.stdout.startswith(prompt)
    assert len(re.findall(r"[\uac00-\ud7a3]", result.stdout[len(prompt):])) > 3  # Korean text follows (sampled)


def test_serving_examples_run():
    """The engine section's two Python examples (sync and asyncio) run as written."""
    text = README.read_text(encoding="utf-8")
    start = text.index("## Serving: the engine")
    section = text[start:text.index("\n## ", start)]  # up to the next section (the HTTP server's)
    blocks = re.findall(r"```python\n(.*?)```", section, re.S)
    assert len(blocks) == 2
    for block in blocks:
        result = subprocess.run([sys.executable, "-c", block], capture_output=True, text=True, timeout=300)
        assert result.returncode == 0, result.stderr
        assert result.stdout.strip()
