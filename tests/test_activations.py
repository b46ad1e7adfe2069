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
