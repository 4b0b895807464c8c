"""SlotCache: tree forwards equal sequential forwards; keep/compact preserve exactness and bound memory."""

import torch
from conftest import left_padded_batch, tiny_model

from hf_specdec.cache import SlotCache
from hf_specdec.draft import ancestor_matrix, node_depths


@torch.no_grad()
def reference_logits(model, sequence):
    return model(input_ids=torch.tensor([sequence])).logits[0]


@torch.no_grad()
def test_tree_forward_equals_each_path_run_alone():
    model = tiny_model("llama", seed=1)
    batch = left_padded_batch(96, [5, 8], seed=1)
    cache = SlotCache(model, 2, torch.device("cpu"))
    cache.forward_committed(batch["input_ids"], batch["attention_mask"].bool())
    # a tree hanging off each row's prompt: nodes 0,1 children of the root; 2 child of 0; 3 child of 2
    parents = torch.tensor([[-1, -1, 0, 2], [-1, -1, 0, 2]])
    tokens = torch.tensor([[10, 11, 12, 13], [20, 21, 22, 23]])
    ancestors = ancestor_matrix(parents)
    depths = node_depths(parents) - 1
    logits = cache.forward_tentative(tokens, torch.arange(4).expand(2, -1), depths, ancestors).logits
    for row in range(2):
        prompt = batch["input_ids"][row][batch["attention_mask"][row].bool()].tolist()
        for node in range(4):
            path = [int(tokens[row, j]) for j in range(4) if ancestors[row, node, j]]
            expected = reference_logits(model, prompt + path)[-1]
            torch.testing.assert_close(logits[row, node], expected, atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_keep_then_continue_matches_fresh_run_and_compaction_bounds_memory():
    model = tiny_model("llama", seed=2)
    batch = left_padded_batch(96, [3, 9, 6], seed=2)
    cache = SlotCache(model, 3, torch.device("cpu"))
    cache.forward_committed(batch["input_ids"], batch["attention_mask"].bool())
    texts = [batch["input_ids"][r][batch["attention_mask"][r].bool()].tolist() for r in range(3)]
    generator = torch.Generator().manual_seed(0)
    for round_index in range(40):
        tokens = torch.randint(3, 96, (3, 4), generator=generator)
        chain = torch.ones(4, 4, dtype=torch.bool).tril().expand(3, -1, -1)
        cache.forward_tentative(tokens, torch.arange(4).expand(3, -1), torch.arange(4).expand(3, -1), chain)
        counts = torch.tensor([round_index % 5, 4, 1]).clamp(max=4)  # ragged acceptance
        cache.keep(torch.arange(4).expand(3, -1), counts)
        for row in range(3):
            texts[row] += tokens[row, : int(counts[row])].tolist()
        cache.compact(min_length=16)
        real = cache.committed.sum(-1)
        assert cache.length <= max(16, 2 * int(real.max()) + 4), "holes must not accumulate without bound"
    probe = torch.tensor([[5], [6], [7]])
    logits = cache.forward_committed(probe, torch.ones(3, 1, dtype=torch.bool)).logits[:, -1]
    for row in range(3):
        expected = reference_logits(model, texts[row] + [int(probe[row])])[-1]
        torch.testing.assert_close(logits[row], expected, atol=1e-4, rtol=1e-4)


@torch.no_grad()
def test_select_rows_drops_finished_rows():
    model = tiny_model("llama", seed=3)
    batch = left_padded_batch(96, [4, 6, 5], seed=3)
    cache = SlotCache(model, 3, torch.device("cpu"))
    cache.forward_committed(batch["input_ids"], batch["attention_mask"].bool())
    cache.select_rows(torch.tensor([2, 0]))
    logits = cache.forward_committed(torch.tensor([[9], [9]]), torch.ones(2, 1, dtype=torch.bool)).logits[:, -1]
    for index, row in enumerate([2, 0]):
        prompt = batch["input_ids"][row][batch["attention_mask"][row].bool()].tolist()
        torch.testing.assert_close(logits[index], reference_logits(model, prompt + [9])[-1], atol=1e-5, rtol=1e-5)
