"""Model ids from the local Hugging Face cache (kogpt_fast.hub): found by id and revision, never downloaded."""
from __future__ import annotations

import pytest
import torch

from hub_fixtures import REPO_ID, REVISIONS, build_fake_hub_cache
from kogpt_fast import KoGPTForCausalLM, KoGPTTokenizer
from kogpt_fast.hub import checkpoint_dir

FLOAT16, FLOAT32 = "KoGPT6B-ryan1.5b-float16", "KoGPT6B-ryan1.5b"


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return build_fake_hub_cache(tmp_path_factory.mktemp("hub"))


@pytest.fixture
def default_cache(cache, monkeypatch):
    """The fake cache as huggingface_hub's default (what HF_HUB_CACHE sets when the process starts)."""
    import huggingface_hub.constants

    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(cache))
    return cache


@pytest.mark.parametrize("revision", [FLOAT16, FLOAT32])
def test_model_and_tokenizer_by_id_and_revision(default_cache, revision):
    sha, n_positions = REVISIONS[revision]
    model = KoGPTForCausalLM.from_pretrained(REPO_ID, revision=revision, device="cpu")
    assert model.config.n_positions == n_positions  # this revision's config, not the other's
    assert model.name_or_path.endswith(f"snapshots/{sha}")
    tokenizer = KoGPTTokenizer.from_pretrained(REPO_ID, revision=revision)
    assert tokenizer.name_or_path.endswith(f"snapshots/{sha}/tokenizer.model")
    ids = tokenizer.encode("대한민국은", return_tensors="pt")
    demo = KoGPTForCausalLM.from_pretrained(device="cpu")
    assert torch.equal(model.generate(ids, max_new_tokens=5), demo.generate(ids, max_new_tokens=5))


def test_a_commit_sha_is_a_revision_and_cache_dir_is_honoured(cache):
    sha, n_positions = REVISIONS[FLOAT32]
    assert checkpoint_dir(REPO_ID, revision=sha, cache_dir=cache).name == sha
    model = KoGPTForCausalLM.from_pretrained(REPO_ID, revision=sha, cache_dir=cache, device="cpu")
    assert model.config.n_positions == n_positions


def test_hf_transformers_finds_the_same_snapshot(cache):
    from transformers.utils import cached_file

    for revision, (sha, _) in REVISIONS.items():
        theirs = cached_file(REPO_ID, "config.json", revision=revision, cache_dir=cache, local_files_only=True)
        assert str(checkpoint_dir(REPO_ID, revision=revision, cache_dir=cache) / "config.json") == theirs


@pytest.mark.parametrize(
    "repo, revision, found",
    [
        (REPO_ID, "KoGPT6B-ryan1.5b-int8", "has no snapshot for revision 'KoGPT6B-ryan1.5b-int8' (revisions there: "
                                           "KoGPT6B-ryan1.5b, KoGPT6B-ryan1.5b-float16)"),
        (REPO_ID, None, "has no snapshot for revision 'main'"),
        ("EleutherAI/gpt-j-6b", "float16", "there is no "),
    ],
)
def test_a_model_not_in_the_cache_names_where_it_looked_and_the_download_command(cache, repo, revision, found):
    command = f"hf download {repo}" + (f" --revision {revision}" if revision else "") + f" --cache-dir {cache}"
    for load in (KoGPTForCausalLM.from_pretrained, KoGPTTokenizer.from_pretrained):
        with pytest.raises(FileNotFoundError) as error:
            load(repo, revision=revision, cache_dir=cache)
        message = str(error.value)
        assert found in message and str(cache) in message and message.endswith(command), message


def test_a_path_is_not_taken_for_an_id(tmp_path):
    with pytest.raises(FileNotFoundError, match="no model directory at /nonexistent/kogpt"):
        KoGPTForCausalLM.from_pretrained("/nonexistent/kogpt")
    with pytest.raises(FileNotFoundError, match="no model directory at ./kogpt"):
        KoGPTTokenizer.from_pretrained("./kogpt")
