"""SlotCache: tree forwards equal sequential forwards; keep preserves exactness; memory is preallocated once."""

import torch
from conftest import left_padded_batch, tiny_model

from hf_specdec.cache import SlotCache
from hf_specdec.draft import ancestor_matrix, node_depths


@torch.no_grad()
def reference_logits(model, sequence):
    return model(input_ids=torch.tensor([sequence])).logits[0]


def prompt_of(batch, row):
    return batch["input_ids"][row][batch["attention_mask"][row].bool()].tolist()


@torch.no_grad()
def test_tree_forward_equals_each_path_run_alone():
    model = tiny_model("llama", seed=1)
    batch = left_padded_batch(96, [5, 8], seed=1)
    cache = SlotCache(model, 2, capacity=32, device=torch.device("cpu"), max_round_nodes=4)
    cache.prefill(batch["input_ids"], batch["attention_mask"].bool())
    # a tree hanging off each row's prompt: nodes 0,1 children of the root; 2 child of 0; 3 child of 2
    parents = torch.tensor([[-1, -1, 0, 2], [-1, -1, 0, 2]])
    tokens = torch.tensor([[10, 11, 12, 13], [20, 21, 22, 23]])
    ancestors = ancestor_matrix(parents, 4)
    depths = node_depths(parents, 4) - 1
    logits = cache.forward_tentative(tokens, torch.arange(4).expand(2, -1), depths, ancestors).logits
    for row in range(2):
        for node in range(4):
            path = [int(tokens[row, j]) for j in range(4) if ancestors[row, node, j]]
            expected = reference_logits(model, prompt_of(batch, row) + path)[-1]
            torch.testing.assert_close(logits[row, node], expected, atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_keep_then_continue_matches_fresh_run_in_fixed_memory():
    model = tiny_model("llama", seed=2)
    batch = left_padded_batch(96, [3, 9, 6], seed=2)
    cache = SlotCache(model, 3, capacity=9 + 40 * 4 + 8, device=torch.device("cpu"), max_round_nodes=4)
    cache.prefill(batch["input_ids"], batch["attention_mask"].bool())
    keys = cache.cache.layers[0].keys
    texts = [prompt_of(batch, row) for row in range(3)]
    generator = torch.Generator().manual_seed(0)
    parents = torch.tensor([[-1, 0, -1, 1]] * 3)  # a small tree: 0 -> 1 -> 3, and 2 beside 0
    for round_index in range(40):
        tokens = torch.randint(3, 96, (3, 4), generator=generator)
        cache.forward_tentative(tokens, torch.arange(4).expand(3, -1), node_depths(parents, 4) - 1,
                                ancestor_matrix(parents, 4))
        # ragged acceptance along the path 0 -> 1 -> 3 (or the single node 2)
        path = torch.tensor([[0, 1, 3], [0, 1, 3], [2, -1, -1]])
        counts = torch.tensor([round_index % 4, 3, 1])
        cache.keep(path, counts)
        for row in range(3):
            texts[row] += [int(tokens[row, int(node)]) for node in path[row, : int(counts[row])]]
    assert cache.cache.layers[0].keys is keys, "slots are written in place, never reallocated"
    probe = torch.tensor([[5], [6], [7]])
    logits = cache.forward_committed(probe, torch.ones(3, 1, dtype=torch.bool)).logits[:, -1]
    for row in range(3):
        expected = reference_logits(model, texts[row] + [int(probe[row])])[-1]
        torch.testing.assert_close(logits[row], expected, atol=1e-4, rtol=1e-4)


@torch.no_grad()
def test_select_rows_drops_finished_rows():
    model = tiny_model("llama", seed=3)
    batch = left_padded_batch(96, [4, 6, 5], seed=3)
    cache = SlotCache(model, 3, capacity=16, device=torch.device("cpu"))
    cache.prefill(batch["input_ids"], batch["attention_mask"].bool())
    cache.select_rows(torch.tensor([2, 0]))
    logits = cache.forward_committed(torch.tensor([[9], [9]]), torch.ones(2, 1, dtype=torch.bool)).logits[:, -1]
    for index, row in enumerate([2, 0]):
        torch.testing.assert_close(logits[index], reference_logits(model, prompt_of(batch, row) + [9])[-1],
                                   atol=1e-5, rtol=1e-5)


@torch.no_grad()
def test_committed_holes_and_chunked_prefill():
    """Right-aligned pending tokens with holes on the left (as drafters feed them) and a chunked prefill."""
    model = tiny_model("llama", seed=4)
    batch = left_padded_batch(96, [7, 2, 5], seed=4)
    cache = SlotCache(model, 3, capacity=24, device=torch.device("cpu"))
    cache.prefill(batch["input_ids"], batch["attention_mask"].bool(), chunk_size=3)
    pending = torch.tensor([[0, 11, 12], [0, 0, 13], [14, 15, 16]])
    valid = pending > 0
    logits = cache.forward_committed(pending, valid).logits[:, -1]
    for row in range(3):
        text = prompt_of(batch, row) + [int(t) for t in pending[row][valid[row]]]
        torch.testing.assert_close(logits[row], reference_logits(model, text)[-1], atol=1e-5, rtol=1e-5)
