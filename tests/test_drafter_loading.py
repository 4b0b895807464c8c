"""`load_drafter` picks the drafter a checkpoint holds; `SyntheticTokenizer` round-trips text."""

import pytest
import torch
from conftest import left_padded_batch, tiny_model

from hf_specdec import GuidedDrafter, ModelDrafter, SortedDrafter, TreeConfig
from hf_specdec.drafters import drafter_kind, load_drafter
from hf_specdec.drafters.guided import GuidedModelDrafter
from hf_specdec.testing import FIRST_ORDINARY_TOKEN_ID, SyntheticTokenizer


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    root = tmp_path_factory.mktemp("drafters")
    target = tiny_model("llama", seed=1)
    draft = tiny_model("llama", seed=2)
    draft.save_pretrained(root / "model")
    SortedDrafter.from_target(target, exits=[1, 2], thresholds=[0.6]).save_pretrained(root / "sorted")
    GuidedDrafter.from_drafter(draft, target_config=target.config, verifier_layers=[1]).save_pretrained(root / "guided")
    return target, root


@pytest.mark.parametrize(("name", "kind", "drafter_class"), [
    ("model", "model", ModelDrafter), ("sorted", "sorted", SortedDrafter), ("guided", "guided", GuidedModelDrafter),
])
def test_load_drafter_picks_the_checkpoints_kind_and_drafts_losslessly(checkpoints, name, kind, drafter_class):
    target, root = checkpoints
    assert drafter_kind(str(root / name)) == kind
    drafter = load_drafter(str(root / name), num_draft_tokens=3, tree=TreeConfig(2, 2, 4) if name == "model" else None)
    assert type(drafter) is drafter_class and drafter.num_draft_tokens == 3
    if kind == "sorted":
        assert drafter.exits == [1, 2] and list(drafter.thresholds) == pytest.approx([0.6])
    batch = left_padded_batch(target.config.vocab_size, [5, 2], seed=0)
    plain = target.generate(**batch, max_new_tokens=8, do_sample=False)
    assert torch.equal(target.generate(**batch, max_new_tokens=8, do_sample=False, assistant_model=drafter), plain)


def test_synthetic_tokenizer_round_trips_text_and_shows_other_ids():
    tokenizer = SyntheticTokenizer(vocab_size=512)
    ids = tokenizer.encode("déjà vu")
    assert len(ids) == len("déjà vu".encode()) and min(ids) >= FIRST_ORDINARY_TOKEN_ID and max(ids) < 259
    assert tokenizer.decode(ids) == "déjà vu"
    assert tokenizer.decode(torch.tensor([300, *ids[:1], 0])) == "⟨300⟩d"
    assert tokenizer.decode(ids[:2]) == "d\ufffd"  # half of "é": replaced, never an exception
    assert tokenizer.decode([0], skip_special_tokens=False) == "⟨0⟩"
    with pytest.raises(ValueError, match="vocab_size"):
        SyntheticTokenizer(vocab_size=100)
