"""The mathematics of the attack: projection, run-time ablation == weight orthogonalisation, export."""
import torch

from refusal_rank.ablation import export_orthogonalized, orthogonalize_weights, orthogonalized, orthonormalize, project_out
from refusal_rank.activations import Ablation, ActAdd, collect_residuals, last_token_logprobs


def _basis(d, k, seed=0):
    g = torch.Generator().manual_seed(seed)
    return orthonormalize(torch.randn(d, k, generator=g, dtype=torch.float64))


def test_project_out_removes_exactly_the_subspace():
    U = _basis(16, 3)
    x = torch.randn(10, 16, dtype=torch.float64)
    y = project_out(x, U)
    assert (y @ U).abs().max() < 1e-12
    # the orthogonal complement is untouched
    v = torch.randn(16, dtype=torch.float64)
    v_perp = v - U @ (U.T @ v)
    assert torch.allclose(project_out(v_perp[None], U)[0], v_perp, atol=1e-12)
    # idempotent
    assert torch.allclose(project_out(y, U), y, atol=1e-12)


def test_orthonormalize():
    B = _basis(20, 4)
    assert torch.allclose(B.T @ B, torch.eye(4, dtype=torch.float64), atol=1e-12)
    # a dependent column is dropped
    V = torch.cat([B, B[:, :1] * 2], dim=1)
    assert orthonormalize(V).shape[1] == 4


def test_runtime_ablation_equals_weight_orthogonalisation(tiny, prompts):
    for k in (1, 3):
        U = _basis(tiny.d_model, k, seed=k)
        base = last_token_logprobs(tiny, prompts, 2)
        runtime = last_token_logprobs(tiny, prompts, 2, Ablation(U))
        with orthogonalized(tiny, U):
            edited = last_token_logprobs(tiny, prompts, 2)
        assert (runtime - base).abs().max() > 1e-3, "the ablation must change the model"
        assert torch.allclose(runtime, edited, atol=2e-5), (runtime - edited).abs().max()
    # weights are restored exactly after the context
    assert torch.equal(last_token_logprobs(tiny, prompts, 2), base)


def test_ablated_stream_is_orthogonal_to_basis(tiny, prompts):
    U = _basis(tiny.d_model, 2, seed=5)
    acts = collect_residuals(tiny, prompts, 4, intervention=Ablation(U))
    assert (acts.double() @ U).abs().max() < 1e-4
    with orthogonalized(tiny, U):
        acts_w = collect_residuals(tiny, prompts, 4)
    assert (acts_w.double() @ U).abs().max() < 1e-4


def test_unembedding_untouched_by_orthogonalisation(tiny):
    U = _basis(tiny.d_model, 1, seed=2)
    head = tiny.model.get_output_embeddings().weight.detach().clone()
    with orthogonalized(tiny, U):
        assert torch.equal(tiny.model.get_output_embeddings().weight, head)
        emb = tiny.model.get_input_embeddings().weight
        assert (emb.double() @ U).abs().max() < 1e-5


def test_export_loads_with_plain_from_pretrained(tiny, prompts, tmp_path):
    from transformers import AutoModelForCausalLM

    U = _basis(tiny.d_model, 2, seed=9)
    export_orthogonalized(tiny, U, tmp_path / "export")
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "export").eval()
    assert not model.config.tie_word_embeddings
    from refusal_rank.activations import encode

    enc = encode(tiny, prompts)
    with torch.no_grad():
        logits = model(**enc).logits[:, -1].float().log_softmax(-1)
    runtime = last_token_logprobs(tiny, prompts, 4, Ablation(U))
    assert torch.allclose(logits, runtime, atol=2e-5)


def test_actadd_changes_only_from_its_layer(tiny, prompts):
    v = torch.randn(tiny.d_model, dtype=torch.float64) * 5
    layer = 2
    plain = collect_residuals(tiny, prompts, 4)
    added = collect_residuals(tiny, prompts, 4, intervention=ActAdd(layer, v))
    assert torch.allclose(plain[:, :layer], added[:, :layer])
    assert torch.allclose(added[:, layer] - plain[:, layer], v.float().expand_as(plain[:, layer]), atol=1e-4)


def test_in_place_edit_on_a_copy(tiny):
    import copy

    model = copy.deepcopy(tiny.model)
    U = _basis(tiny.d_model, 1, seed=3)
    orthogonalize_weights(model, U)
    W = model.model.layers[0].self_attn.o_proj.weight.double()
    assert (U.T @ W).abs().max() < 1e-5
    b = model.model.layers[0].self_attn.o_proj.bias.double()
    assert (U.T @ b).abs().max() < 1e-5


def test_combined_ablation_and_addition(tiny, prompts):
    """A tuple (Ablation, ActAdd) applies both: the added vector's component in span(U) is removed by
    the next writes only, so the block input at the addition layer carries it."""
    U = _basis(tiny.d_model, 1, seed=4)
    v = torch.randn(tiny.d_model, dtype=torch.float64) * 4
    both = collect_residuals(tiny, prompts, 4, intervention=(Ablation(U), ActAdd(2, v)))
    abl = collect_residuals(tiny, prompts, 4, intervention=Ablation(U))
    assert torch.allclose(both[:, :2], abl[:, :2], atol=1e-5)
    assert torch.allclose(both[:, 2] - abl[:, 2], v.float().expand_as(abl[:, 2]), atol=1e-4)
