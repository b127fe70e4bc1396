"""Real transformers from the ``transformers`` library (small configs, random weights, no
download): tracer="export", training with a sparsifier and scheduler, torch.compile,
torch.export, squash, lowering."""
import copy
import os

import pytest
import torch
import torch._dynamo
from torch._dynamo.testing import CompileCounterWithBackend

import fx_sparsity as fxs
from fx_sparsity.passes import find_masked_uses

pytestmark = pytest.mark.slow  # the quick loop (-m 'not slow') skips it; CI runs it

transformers = pytest.importorskip("transformers")

# Dynamo capture + AOTAutograd by default (inductor's code generation for BERT takes ~30 s on
# 2 cores; the small-model tests in test_compile.py run inductor). Set to "inductor" to run it.
BACKEND = os.environ.get("FX_SPARSITY_TEST_COMPILE_BACKEND", "aot_eager")


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


@pytest.fixture(scope="module")
def bert():
    torch.manual_seed(0)
    config = transformers.BertConfig(hidden_size=64, num_hidden_layers=2, num_attention_heads=2,
                                     intermediate_size=128, vocab_size=100, max_position_embeddings=32)
    model = transformers.BertModel(config).eval()  # eval: no dropout, so runs are comparable
    ids = torch.randint(0, 100, (2, 12))
    attention_mask = torch.ones(2, 12, dtype=torch.long)
    attention_mask[1, 9:] = 0  # padding, so the mask path is exercised
    return model, {"input_ids": ids, "attention_mask": attention_mask}


def _loss(out):
    return out.last_hidden_state.square().mean() + out.pooler_output.square().mean()


def test_bert_prepare_train_compile_squash(bert):
    model, inputs = bert
    with pytest.raises(fxs.TraceError, match='cannot trace BertModel(.|\n)*tracer="export"'):
        fxs.prepare_fx_sparse(model, fxs.WeightNormSparsifier())

    sparsifier = fxs.WeightNormSparsifier(sparsity_level=0.75, sparse_block_shape=(1, 4))
    prepared = fxs.prepare_fx_sparse(model, sparsifier, tracer="export", example_inputs=inputs)
    linears = [name for name, m in model.named_modules() if type(m) is torch.nn.Linear]
    assert len(linears) == 13  # q, k, v, attention out, intermediate, output per layer, and the pooler
    assert sorted(g["tensor_fqn"] for g in sparsifier.groups) == sorted(f"{n}.weight" for n in linears)
    assert len(find_masked_uses(prepared)) == 13
    out = prepared(**inputs)
    assert type(out) is type(model(**inputs))  # the library's output class survives export
    torch.testing.assert_close(out.last_hidden_state, model(**inputs).last_hidden_state)

    scheduler = fxs.CubicSL(sparsifier, total_t=3, delta_t=1)
    optimizer = torch.optim.SGD(prepared.parameters(), lr=0.1)
    for _ in range(4):
        loss = _loss(prepared(**inputs))
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        sparsifier.step()
        scheduler.step()
    query = "encoder.layer.0.attention.self.query.weight"
    assert sparsifier.get_mask(query).mean().item() == pytest.approx(0.25)

    # Compiled training step: whole graph, same loss and gradients, new masks seen without recompiling.
    counter = CompileCounterWithBackend(BACKEND)
    compiled = torch.compile(prepared, backend=counter, fullgraph=True)
    with torch._dynamo.config.patch(error_on_recompile=True):
        for level in (0.75, 0.9):
            for group in sparsifier.groups:
                group["sparsity_level"] = level
            sparsifier.step()
            grads = []
            for call in (prepared, compiled):
                optimizer.zero_grad()
                loss = _loss(call(**inputs))
                loss.backward()
                grads.append((loss.detach(), prepared.get_parameter(query).grad.clone()))
            torch.testing.assert_close(grads[1], grads[0])
            assert torch.all(grads[1][1][sparsifier.get_mask(query) == 0] == 0)
    assert counter.frame_count == 1

    # Exported as a program, masks are buffers.
    ep = torch.export.export(prepared, (), inputs)
    assert sum(b.endswith("_mask") for b in ep.graph_signature.buffers) == 13
    torch.testing.assert_close(ep.module()(**inputs).last_hidden_state, prepared(**inputs).last_hidden_state)

    expected = prepared(**inputs).last_hidden_state
    squashed = sparsifier.squash_mask(params_to_keep=("sparse_block_shape",))
    assert not find_masked_uses(squashed)
    assert (squashed.get_parameter(query) == 0).float().mean().item() == pytest.approx(0.9, abs=0.01)
    torch.testing.assert_close(squashed(**inputs).last_hidden_state, expected)
    # The squashed module compiles again (new graph, no mask multiplies) and agrees.
    torch.testing.assert_close(compiled(**inputs).last_hidden_state, expected)
    assert counter.frame_count == 2

    # Lowered: every Linear becomes a sparse int8 kernel; close to the float model, not exact.
    with torch.no_grad():
        lowered = fxs.convert_fx_sparse(squashed)
        out = lowered(**inputs).last_hidden_state
    infos = [m.fx_sparsity_info for m in lowered.modules() if hasattr(m, "fx_sparsity_info")]
    assert len(infos) == 13
    assert {i["lowered_to"] for i in infos} == {"SparseQuantizedDynamicLinear"}
    assert all(i["weight_sparsity"] == pytest.approx(0.9, abs=0.01) for i in infos)
    assert (out - expected).abs().max().item() < 0.02  # LayerNorms keep activations O(1)


def test_gpt2_tied_embedding_one_mask_at_both_uses():
    torch.manual_seed(0)
    config = transformers.GPT2Config(n_embd=32, n_layer=1, n_head=2, vocab_size=64, n_positions=16,
                                     use_cache=False, bos_token_id=0, eos_token_id=0)
    model = transformers.GPT2LMHeadModel(config).eval()
    assert model.lm_head.weight is model.transformer.wte.weight
    ids = torch.randint(0, 64, (2, 10))
    sparsifier = fxs.WeightNormSparsifier(sparsity_level=0.5, sparse_block_shape=(1, 4))
    # GPT-2's attention and MLP use transformers' Conv1D (weight stored (in, out)): named explicitly.
    config = [{"tensor_fqn": "lm_head.weight"}, {"tensor_fqn": "transformer.h.0.mlp.c_fc.weight"}]
    prepared = fxs.prepare_fx_sparse(model, sparsifier, config, tracer="export", example_inputs={"input_ids": ids})
    uses = find_masked_uses(prepared)
    # export keeps one live read of the tied tensor (plus a dead one, which gets no mul)
    assert sorted(u.mask_fqn for u in uses) == ["lm_head.weight_mask", "transformer.h.0.mlp.c_fc.weight_mask"]
    tied_mul = next(u.mul for u in uses if u.mask_fqn == "lm_head.weight_mask")
    assert len(tied_mul.users) == 2  # the embedding lookup and the output projection
    optimizer = torch.optim.SGD(prepared.parameters(), lr=0.1)
    for _ in range(2):
        sparsifier.step()
        loss = prepared(input_ids=ids).logits.logsumexp(-1).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    mask = sparsifier.get_mask("lm_head.weight")
    embedding = prepared.get_parameter("lm_head.weight")
    assert torch.all(embedding.grad[mask == 0] == 0)  # neither the lookup nor the projection reads pruned rows
    # The same masked weights in the original Python model give the same logits.
    reference = copy.deepcopy(model)
    reference.load_state_dict({k: v for k, v in prepared.state_dict().items() if not k.endswith("_mask")},
                              strict=False)
    with torch.no_grad():
        reference.lm_head.weight.mul_(mask)
        reference.transformer.h[0].mlp.c_fc.weight.mul_(sparsifier.get_mask("transformer.h.0.mlp.c_fc.weight"))
    torch.testing.assert_close(prepared(input_ids=ids).logits, reference(input_ids=ids).logits)
