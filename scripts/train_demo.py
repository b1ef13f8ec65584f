"""Train the embedded demo checkpoint: a tiny GPT-J with KoGPT's head geometry, on public-domain Korean text.

The data are the two corpora that ship inside the `konlpy` wheel: the Constitution of the Republic of Korea
(`kolaw/constitution.txt`) and ten National Assembly bills (`kobill/*.txt`). konlpy is never imported (its
`__init__` needs Java): the corpus directory is located through `importlib.util.find_spec`.

Output (HF format, float16, well under 15 MB): config.json, model.safetensors, tokenizer.model (sentencepiece),
tokenizer_config.json. Reproducible: fixed seeds, single-threaded by default. Run from the repository root:

    python scripts/train_demo.py --out kogpt_fast/demo
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import math
import random
import time
from pathlib import Path

import sentencepiece as spm
import torch
from transformers import GPTJConfig, GPTJForCausalLM

# KoGPT's special pieces and their fixed ids.
BOS, EOS, UNK, PAD, MASK = "[BOS]", "[EOS]", "[UNK]", "[PAD]", "[MASK]"
BOS_ID, EOS_ID, UNK_ID, PAD_ID, MASK_ID = 0, 1, 2, 3, 4
SAMPLE_PROMPTS = ("대한민국은", "국회는", "모든 국민은")
CHECKPOINT_FILES = ("config.json", "model.safetensors", "tokenizer.model", "tokenizer_config.json")


def parse_args() -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="kogpt_fast/demo", help="output directory (default: %(default)s)")
    p.add_argument("--steps", type=int, default=800, help="optimizer steps (default: %(default)s)")
    p.add_argument("--threads", type=int, default=1, help="torch CPU threads (default: %(default)s)")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--seq-len", type=int, default=256)
    p.add_argument("--lr", type=float, default=2e-3, help="peak learning rate")
    p.add_argument("--warmup", type=int, default=30, help="linear warmup steps")
    p.add_argument("--vocab-size", type=int, default=2400)
    p.add_argument("--seed", type=int, default=1234)
    p.add_argument("--log-every", type=int, default=25)
    return p.parse_args()


def seed_everything(seed: int) -> None:
    random.seed(seed)
    torch.manual_seed(seed)
    spm.set_random_generator_seed(seed)


def corpus_dir() -> Path:
    """`<site-packages>/konlpy/data/corpus`, found without executing konlpy/__init__.py."""
    spec = importlib.util.find_spec("konlpy")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("konlpy is not installed: pip install --no-deps konlpy")
    return Path(list(spec.submodule_search_locations)[0]) / "data" / "corpus"


def read_documents() -> list[str]:
    """The constitution then the bills in file order; CRLF -> LF, surrounding blank space stripped."""
    root = corpus_dir()
    paths = [root / "kolaw" / "constitution.txt", *sorted((root / "kobill").glob("*.txt"))]
    return [p.read_text(encoding="utf-8").replace("\r\n", "\n").strip() for p in paths]


def train_tokenizer(docs: list[str], path: Path, vocab_size: int) -> spm.SentencePieceProcessor:
    """BPE with byte fallback and identity normalization, so decode(encode(text)) == text exactly."""
    lines = [line for doc in docs for line in doc.split("\n") if line.strip()]
    model = path.open("wb")
    with model:
        spm.SentencePieceTrainer.train(
            sentence_iterator=iter(lines), model_writer=model, model_type="bpe", vocab_size=vocab_size,
            character_coverage=1.0, byte_fallback=True, normalization_rule_name="identity",
            remove_extra_whitespaces=False, add_dummy_prefix=False, allow_whitespace_only_pieces=True,
            bos_id=BOS_ID, eos_id=EOS_ID, unk_id=UNK_ID, pad_id=PAD_ID,
            bos_piece=BOS, eos_piece=EOS, unk_piece=UNK, pad_piece=PAD, control_symbols=[MASK],
            num_threads=1, minloglevel=2,
        )
    sp = spm.SentencePieceProcessor(model_file=str(path))
    assert sp.piece_to_id(MASK) == MASK_ID and sp.get_piece_size() == vocab_size
    bad = [i for i, doc in enumerate(docs) if sp.decode(sp.encode(doc)) != doc]
    assert not bad, f"tokenizer round trip is not exact for documents {bad}"
    return sp


def encode_corpus(sp: spm.SentencePieceProcessor, docs: list[str]) -> torch.Tensor:
    """One token stream: every document wrapped as [BOS] text [EOS]."""
    ids = [tok for doc in docs for tok in (BOS_ID, *sp.encode(doc), EOS_ID)]
    return torch.tensor(ids, dtype=torch.long)


def build_model(vocab_size: int, n_positions: int = 512) -> GPTJForCausalLM:
    config = GPTJConfig(
        vocab_size=vocab_size, n_positions=n_positions, n_embd=512, n_layer=2, n_head=2, rotary_dim=64,
        n_inner=1024, activation_function="gelu_new", layer_norm_epsilon=1e-5, tie_word_embeddings=False,
        bos_token_id=BOS_ID, eos_token_id=EOS_ID, pad_token_id=None,
        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0,
    )
    return GPTJForCausalLM(config)


def make_optimizer(model: torch.nn.Module, lr: float) -> torch.optim.AdamW:
    """AdamW; weight decay on matrices only (not on biases, LayerNorms)."""
    decay = [p for p in model.parameters() if p.dim() >= 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    groups = [{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}]
    return torch.optim.AdamW(groups, lr=lr, betas=(0.9, 0.95), eps=1e-8)


def lr_at(step: int, args: argparse.Namespace) -> float:
    """Linear warmup, then cosine decay to 10% of the peak."""
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    progress = (step - args.warmup) / max(1, args.steps - args.warmup)
    return args.lr * (0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress)))


def random_batch(stream: torch.Tensor, args: argparse.Namespace, gen: torch.Generator) -> torch.Tensor:
    starts = torch.randint(0, len(stream) - args.seq_len, (args.batch_size,), generator=gen)
    return torch.stack([stream[s : s + args.seq_len] for s in starts.tolist()])


def train(model: GPTJForCausalLM, stream: torch.Tensor, args: argparse.Namespace) -> float:
    """Train on random windows of the stream; returns the mean loss of the last `log_every` steps."""
    opt = make_optimizer(model, args.lr)
    gen = torch.Generator().manual_seed(args.seed)
    model.train()
    t0, recent = time.time(), []
    for step in range(args.steps):
        for group in opt.param_groups:
            group["lr"] = lr_at(step, args)
        batch = random_batch(stream, args, gen)
        loss = model(input_ids=batch, labels=batch).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        recent = (recent + [loss.item()])[-args.log_every :]
        if step % args.log_every == 0 or step == args.steps - 1:
            print(f"step {step:5d}  loss {loss.item():.4f}  avg {sum(recent) / len(recent):.4f}  "
                  f"lr {lr_at(step, args):.2e}  {time.time() - t0:6.0f}s", flush=True)
    return sum(recent) / len(recent)


def write_tokenizer_config(out: Path, model_max_length: int) -> None:
    config = {
        "bos_token": BOS, "eos_token": EOS, "unk_token": UNK, "pad_token": PAD, "mask_token": MASK,
        "model_max_length": model_max_length, "add_bos_token": False, "add_eos_token": False,
        "clean_up_tokenization_spaces": False,
    }
    (out / "tokenizer_config.json").write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")


def save_checkpoint(model: GPTJForCausalLM, out: Path) -> None:
    """float16 safetensors + config.json; no generation_config.json (the config carries bos/eos)."""
    model.eval().to(torch.float16).save_pretrained(out, safe_serialization=True)
    (out / "generation_config.json").unlink(missing_ok=True)
    (out / "model.safetensors").chmod(0o644)  # safetensors writes it 0600
    model.to(torch.float32)
    write_tokenizer_config(out, model.config.n_positions)
    size = sum((out / name).stat().st_size for name in CHECKPOINT_FILES)
    print(f"saved {out}: {size / 2**20:.2f} MiB in {', '.join(CHECKPOINT_FILES)}")
    assert size <= 15 * 2**20, "demo checkpoint exceeds 15 MB"


@torch.no_grad()
def greedy_samples(out: Path, max_new_tokens: int = 40) -> None:
    """Reload the saved checkpoint in float32 and continue each prompt greedily (prompt has no [BOS])."""
    model = GPTJForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    sp = spm.SentencePieceProcessor(model_file=str(out / "tokenizer.model"))
    for prompt in SAMPLE_PROMPTS:
        ids = torch.tensor([sp.encode(prompt)])
        new = model.generate(ids, max_new_tokens=max_new_tokens, do_sample=False, pad_token_id=EOS_ID)
        print(f"--- {prompt!r} -> {sp.decode(new[0].tolist())!r}")


def main() -> None:
    args = parse_args()
    torch.set_num_threads(args.threads)
    seed_everything(args.seed)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    docs = read_documents()
    sp = train_tokenizer(docs, out / "tokenizer.model", args.vocab_size)
    stream = encode_corpus(sp, docs)
    print(f"{len(docs)} documents, {sum(map(len, docs))} characters, {len(stream)} tokens "
          f"(vocab {sp.get_piece_size()})")

    model = build_model(sp.get_piece_size())
    print(f"model: {sum(p.numel() for p in model.parameters()):,} parameters")
    t0 = time.time()
    final = train(model, stream, args)
    print(f"trained {args.steps} steps in {time.time() - t0:.0f}s, final loss (mean of last "
          f"{min(args.log_every, args.steps)} steps) {final:.4f}")
    save_checkpoint(model, out)
    greedy_samples(out)


if __name__ == "__main__":
    main()
