"""nnsight reads equal Hugging Face hidden states; padding and batching do not change them."""
import torch

from refusal_rank.activations import collect_residuals, encode, last_token_logprobs


def test_nnsight_residuals_equal_hf_hidden_states(tiny, prompts):
    acts = collect_residuals(tiny, prompts, batch_size=4)  # (n, layers, n_post, d)
    enc = encode(tiny, prompts)
    with torch.no_grad():
        hs = tiny.model(**enc, output_hidden_states=True).hidden_states
    for layer in range(tiny.n_layers):
        ref = hs[layer][:, -tiny.n_post:, :]
        assert torch.allclose(acts[:, layer], ref.float(), atol=1e-6), layer


def test_batching_and_padding_invariance(tiny, prompts):
    a = collect_residuals(tiny, prompts, batch_size=1)
    b = collect_residuals(tiny, prompts, batch_size=4)
    assert torch.allclose(a, b, atol=1e-5)
    la = last_token_logprobs(tiny, prompts, 1)
    lb = last_token_logprobs(tiny, prompts, 3)
    assert torch.allclose(la, lb, atol=1e-5)


def test_post_instruction_positions_from_template(tiny):
    assert tiny.post_tokens == ["<|end|>", "\n", "<|assistant|>", "\n"]
    assert tiny.n_post == 4
    assert len(tiny.refusal_token_ids) >= 1


def test_completion_ce_matches_direct_computation(tiny, prompts):
    from refusal_rank.activations import chat_texts, completion_ce

    comps = [[5, 6, 7], [8, 9], [10, 11, 12, 13], [14]]
    got = completion_ce(tiny, prompts, comps, batch_size=3, chunk=2)
    total, count = 0.0, 0
    for text, c in zip(chat_texts(tiny.tokenizer, prompts), comps):
        p = tiny.tokenizer(text, add_special_tokens=False)["input_ids"]
        ids = torch.tensor([p + c])
        with torch.no_grad():
            logits = tiny.model(input_ids=ids).logits[0].float()
        lp = torch.log_softmax(logits[len(p) - 1:-1], -1)
        total -= lp[torch.arange(len(c)), torch.tensor(c)].sum().item()
        count += len(c)
    assert abs(got - total / count) < 1e-4
