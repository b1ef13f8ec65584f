"""Random GPT-J checkpoints and the HF transformers reference (test-only: transformers is not a runtime dependency)."""
from __future__ import annotations

import torch

DEFAULT_CONFIG = dict(
    vocab_size=211, n_positions=96, n_embd=512, n_layer=2, n_head=2, rotary_dim=64,  # KoGPT's head geometry
    activation_function="gelu_new", layer_norm_epsilon=1e-5, bos_token_id=0, eos_token_id=1,
    tie_word_embeddings=False,
)


def random_hf_model(seed: int = 0, **overrides):
    """A HF GPTJForCausalLM with random weights large enough that greedy tokens vary (logits are not flat)."""
    from transformers import GPTJConfig, GPTJForCausalLM

    cfg = GPTJConfig(**{**DEFAULT_CONFIG, **overrides})
    torch.manual_seed(seed)
    model = GPTJForCausalLM(cfg).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if name.endswith("ln_1.weight") or name.endswith("ln_f.weight"):
                p.copy_(1 + 0.1 * torch.randn_like(p))
            elif "wte" in name:
                p.normal_(0, 1.0)
            elif name.endswith("bias"):
                p.normal_(0, 0.1)
            else:  # gains picked so that top-2 logit margins are mostly > 0.01 and greedy tokens vary
                gain = 4.0 if name.startswith("lm_head") else 2.0
                p.normal_(0, gain / p.shape[-1] ** 0.5)
    return model


def hf_greedy(model, input_ids, attention_mask=None, max_new_tokens=8, **kw):
    with torch.no_grad():
        return model.generate(
            input_ids=input_ids, attention_mask=attention_mask, max_new_tokens=max_new_tokens, do_sample=False,
            pad_token_id=model.config.eos_token_id, **kw,
        )


def left_padded_batch(lengths, vocab, pad, seed=0, device="cpu"):
    """input_ids and attention_mask [B, max(lengths)] of random prompts, left-padded with `pad`."""
    g = torch.Generator().manual_seed(seed)
    width = max(lengths)
    ids = torch.full((len(lengths), width), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, n in enumerate(lengths):
        ids[row, width - n:] = torch.randint(2, vocab, (n,), generator=g)
        mask[row, width - n:] = 1
    return ids.to(device), mask.to(device)
