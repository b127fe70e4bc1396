"""Scoped preparation (``scope="layers"`` and a block class as scope) on real transformers
models built from tiny random configs (no download): the user's model class is kept, the
mask keys are those of a whole-model prepare, training masks the gradients, generate works
(layers scope, with the cache), a block traced once runs on other shapes, compiled models
see new masks without recompiling, and squash + save_pretrained + from_pretrained
round-trips a plain model with the same zeros.
"""
import copy
import dataclasses
import os
import warnings
from collections.abc import Callable

import pytest
import torch
import torch._dynamo
from torch._dynamo.testing import CompileCounterWithBackend

import fx_sparsity as fxs

pytestmark = [
    pytest.mark.slow,  # the quick loop (-m 'not slow') skips it; CI runs it
    pytest.mark.filterwarnings("ignore"),  # transformers' and torch.export's advice is not under test here
]

transformers = pytest.importorskip("transformers")
warnings.filterwarnings("ignore", module="transformers")

from transformers.models.bert.modeling_bert import BertLayer  # noqa: E402
from transformers.models.llama.modeling_llama import LlamaDecoderLayer  # noqa: E402

# Same default as test_transformers_model.py: dynamo capture + AOTAutograd (inductor's code
# generation is slow on 2 cores). Set to "inductor" to run it.
BACKEND = os.environ.get("FX_SPARSITY_TEST_COMPILE_BACKEND", "aot_eager")

VOCAB = 64
PAD, EOS, BOS = 0, 1, 2
SHAPES = [(2, 8), (3, 13)]  # (batch, sequence): the example shape, then another one


@pytest.fixture(autouse=True)
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


# --- the models --------------------------------------------------------------------------------------------------


def _llama():
    config = transformers.LlamaConfig(
        vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, max_position_embeddings=64, pad_token_id=PAD, eos_token_id=EOS, bos_token_id=BOS)
    return transformers.LlamaForCausalLM(config)


def _bert():
    config = transformers.BertConfig(
        vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=2, intermediate_size=64,
        max_position_embeddings=64, num_labels=2, pad_token_id=PAD)
    return transformers.BertForSequenceClassification(config)


def _gpt2():
    config = transformers.GPT2Config(
        vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=2, n_positions=64, bos_token_id=BOS, eos_token_id=EOS,
        pad_token_id=PAD)  # use_cache=True (the default)
    return transformers.GPT2LMHeadModel(config)


@dataclasses.dataclass
class Case:
    name: str
    build: Callable
    block: type | None  # the block class for a block scope; None: layers scope only
    causal_lm: bool  # labels are the input ids (else: one class per sequence)
    config: list | None = None  # None: every nn.Linear weight
    reference_kwargs: dict = dataclasses.field(default_factory=dict)  # for the scope="model" export reference


# GPT-2's attention and MLP use transformers' Conv1D (weight stored (in, out)), not nn.Linear:
# c_fc is named explicitly, lm_head is tied to transformer.wte (one mask, read at both uses).
GPT2_CONFIG = [{"tensor_fqn": "transformer.h.0.mlp.c_fc.weight"}, {"tensor_fqn": "lm_head.weight"}]

CASES = {
    "llama": Case("llama", _llama, LlamaDecoderLayer, True, reference_kwargs={"use_cache": False}),
    "bert": Case("bert", _bert, BertLayer, False),
    "gpt2": Case("gpt2", _gpt2, None, True, GPT2_CONFIG, reference_kwargs={"use_cache": False}),
}

# (case, scope) pairs: "layers" for all three, the block class for Llama and BERT.
SCOPED = [("llama", "layers"), ("llama", "block"), ("bert", "layers"), ("bert", "block"), ("gpt2", "layers")]

def _on_other_shapes(pairs):
    """The (case, scope) pairs. (BertLayer gets position_ids=None in its **kwargs: None keyword inputs are left
    out of the export, so its dims stay dynamic.)"""
    return list(pairs)


def _batch(case: Case, batch: int, seq: int, seed: int) -> dict:
    """input_ids, a left-padded attention mask (row 1 has 3 pads) and labels."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(3, VOCAB, (batch, seq), generator=g)
    attention_mask = torch.ones_like(ids)
    attention_mask[1, :3] = 0
    ids[1, :3] = PAD
    if case.causal_lm:
        labels = ids.masked_fill(attention_mask == 0, -100)
    else:
        labels = torch.randint(0, 2, (batch,), generator=g)
    return {"input_ids": ids, "attention_mask": attention_mask, "labels": labels}


def _inputs(case: Case, batch: int, seq: int, seed: int = 0) -> dict:
    out = _batch(case, batch, seq, seed)
    del out["labels"]
    return out


def _example(case: Case) -> dict:
    """The block scope's example inputs: 2 x 8, padded (so the attention mask is traced as a tensor),
    without the cache (a DynamicCache is no input torch.export takes)."""
    example = _inputs(case, *SHAPES[0])
    if case.causal_lm:
        example["use_cache"] = False
    return example


@pytest.fixture(scope="module")
def models():
    """One randomly initialised model per case (never modified: the prepares deep-copy)."""
    built = {}
    for i, (name, case) in enumerate(CASES.items()):
        torch.manual_seed(i)
        built[name] = case.build().eval()
    return built


def _sparsifier(level: float = 0.5) -> fxs.WeightNormSparsifier:
    return fxs.WeightNormSparsifier(sparsity_level=level, sparse_block_shape=(1, 4))


def _prepare(model, case: Case, scope: str, sparsifier=None):
    sparsifier = sparsifier or _sparsifier()
    if scope == "layers":
        prepared = fxs.prepare_fx_sparse(model, sparsifier, case.config, scope="layers")
    else:
        prepared = fxs.prepare_fx_sparse(model, sparsifier, case.config, scope=case.block, tracer="export",
                                         example_inputs=_example(case))
    return prepared, sparsifier


def _configured(sparsifier) -> list[str]:
    return [group["tensor_fqn"] for group in sparsifier.groups]


def _mask_keys(module) -> set[str]:
    return {k for k in module.state_dict() if k.endswith("_mask")}


def _call(case: Case, model, scope: str, inputs: dict):
    """A forward; a block scope was traced without the cache, so it is called without it."""
    if scope == "block" and case.causal_lm:
        inputs = {**inputs, "use_cache": False}
    return model(**inputs)


# --- the tests ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("name,scope", SCOPED)
def test_scoped_model_keeps_class_and_mask_keys(models, name, scope):
    case, model = CASES[name], models[name]
    prepared, sparsifier = _prepare(model, case, scope)
    assert isinstance(prepared, type(model))
    assert prepared is not model and not _mask_keys(model)  # a deep copy; the user's model untouched
    assert prepared.config is not None and prepared.config.vocab_size == VOCAB
    graph_modules = [n for n, m in prepared.named_modules() if isinstance(m, torch.fx.GraphModule)]
    assert graph_modules and "" not in graph_modules  # parts replaced, the model itself is not a graph

    fqns = _configured(sparsifier)
    if case.config is None:
        linears = [n for n, m in model.named_modules() if type(m) is torch.nn.Linear]
        assert sorted(fqns) == sorted(f"{n}.weight" for n in linears)
    expected = {f"{fqn}_mask" for fqn in fqns}
    assert _mask_keys(prepared) == expected  # one per configured tensor (tied lm_head/wte: one)

    # The same keys as a whole-model prepare traced by torch.export (the cache off: a DynamicCache is no
    # output torch.export takes); should that export fail, the set above is the contract.
    reference_inputs = {**_inputs(case, *SHAPES[0]), **case.reference_kwargs}
    try:
        reference = fxs.prepare_fx_sparse(model, _sparsifier(), case.config, tracer="export",
                                          example_inputs=reference_inputs)
    except fxs.TraceError:  # pragma: no cover - all three export today
        reference = None
    if reference is not None:
        assert isinstance(reference, torch.fx.GraphModule)
        assert _mask_keys(prepared) == _mask_keys(reference)

    if scope == "layers":
        owners = {fqn.rpartition(".")[0] for fqn in fqns}
        assert owners <= set(graph_modules)
        if name == "gpt2":  # the embedding reads the tied lm_head weight: traced too, its mask not saved twice
            assert "transformer.wte" in graph_modules
            assert prepared.lm_head.weight is prepared.transformer.wte.weight
    else:
        blocks = [n for n, m in model.named_modules() if isinstance(m, case.block)]
        assert set(blocks) <= set(graph_modules)
        assert not any(n.startswith(b + ".") for n in graph_modules for b in blocks)  # outermost blocks only


@pytest.mark.parametrize("name,scope", _on_other_shapes(SCOPED))
def test_train_step_masks_gradients_on_two_shapes(models, name, scope):
    case, model = CASES[name], models[name]
    torch.manual_seed(0)
    prepared, sparsifier = _prepare(model, case, scope)
    fqns = _configured(sparsifier)
    prepared.train()
    optimizer = torch.optim.SGD(prepared.parameters(), lr=0.1)
    sparsifier.step()
    for seed, (batch, seq) in enumerate(SHAPES):
        optimizer.zero_grad()
        out = _call(case, prepared, scope, _batch(case, batch, seq, seed))
        assert out.logits.shape[0] == batch
        if case.causal_lm:
            assert out.logits.shape[:2] == (batch, seq)
        assert torch.isfinite(out.loss)
        out.loss.backward()
        for fqn in fqns:
            mask = prepared.get_buffer(f"{fqn}_mask")
            grad = prepared.get_parameter(fqn).grad
            assert 0 < (mask == 0).sum() < mask.numel(), fqn
            assert grad is not None and grad.abs().sum() > 0, fqn
            assert torch.all(grad[mask == 0] == 0), fqn
        optimizer.step()
        sparsifier.step()
    for fqn in fqns:  # the step wrote the masks in place and they are still the ones saved
        assert prepared.state_dict()[f"{fqn}_mask"].data_ptr() == prepared.get_buffer(f"{fqn}_mask").data_ptr()


def _masked_original(model, prepared, fqns):
    """A deep copy of the original model whose configured weights are multiplied by the prepared model's masks."""
    reference = copy.deepcopy(model).eval()
    with torch.no_grad():
        for fqn in fqns:
            reference.get_parameter(fqn).mul_(prepared.get_buffer(f"{fqn}_mask"))
    return reference


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_layers_scope_generate_equals_masked_original(models, name):
    case, model = CASES[name], models[name]
    prepared, sparsifier = _prepare(model, case, "layers")
    sparsifier.step()
    prepared.eval()
    reference = _masked_original(model, prepared, _configured(sparsifier))
    inputs = _inputs(case, *SHAPES[0])
    with torch.no_grad():
        logits = prepared(**inputs).logits
        torch.testing.assert_close(logits, reference(**inputs).logits)
        assert not torch.allclose(logits, model(**inputs).logits, atol=1e-4)  # the masks matter
        kwargs = {"max_new_tokens": 5, "do_sample": False}
        assert prepared.config.use_cache and prepared.generation_config.use_cache  # generate runs with the cache
        tokens = prepared.generate(**inputs, **kwargs)
        expected = reference.generate(**inputs, **kwargs)
    assert tokens.shape == (2, 8 + 5)
    assert torch.equal(tokens, expected)


@pytest.mark.parametrize("name", ["llama", "bert"])
def test_block_scope_other_shapes_equal_layers_scope(models, name):
    case, model = CASES[name], models[name]
    block, sparsifier = _prepare(model, case, "block")
    sparsifier.step()
    layers, _ = _prepare(model, case, "layers")
    assert _mask_keys(layers) == _mask_keys(block)
    layers.load_state_dict(block.state_dict())  # the same weights and masks
    big = _batch(case, *SHAPES[1], seed=1)  # prepared on 2 x 8: batch and sequence stay dynamic

    block.train()
    out = _call(case, block, "block", big)
    out.loss.backward()
    fqn = _configured(sparsifier)[0]
    mask = block.get_buffer(f"{fqn}_mask")
    assert torch.all(block.get_parameter(fqn).grad[mask == 0] == 0)

    block.eval()
    layers.eval()
    with torch.no_grad():
        for batch, seq in SHAPES:
            inputs = _inputs(case, batch, seq, seed=2)
            torch.testing.assert_close(_call(case, block, "block", inputs).logits, layers(**inputs).logits,
                                       rtol=1e-5, atol=1e-5)


def test_block_scope_generate_with_cache_is_a_known_limitation(models):
    """A block traced by torch.export without a KV cache (cache=None at export) cannot take one: generate with
    the cache is refused with a message that says why, use_cache=False, and scope="layers" (test above)."""
    case, model = CASES["llama"], models["llama"]
    prepared, _ = _prepare(model, case, "block")
    prepared.eval()
    inputs = _inputs(case, *SHAPES[0])
    with torch.no_grad(), pytest.raises(fxs.TraceError, match=r"exported \(tracer=\"export\"\) without a KV cache, and a "
                                                          r"Hugging Face cache \(\w+\) reached it: call the masked "
                                                          r"model with use_cache=False(.|\n)*scope=\"layers\""):
        prepared.generate(**inputs, max_new_tokens=5, do_sample=False, use_cache=True)


def test_compiled_layers_scope_sees_new_masks_without_recompiling(models):
    case, model = CASES["llama"], models["llama"]
    prepared, sparsifier = _prepare(model, case, "layers")
    prepared.eval()
    inputs = {**_inputs(case, *SHAPES[0]), "use_cache": False}
    counter = CompileCounterWithBackend(BACKEND)
    compiled = torch.compile(prepared, backend=counter)
    outputs, frames = [], []
    with torch.no_grad(), torch._dynamo.config.patch(error_on_recompile=True):  # a recompile raises
        for level in (0.5, 0.75):
            for group in sparsifier.groups:
                group["sparsity_level"] = level
            sparsifier.step()
            expected = prepared(**inputs).logits
            got = compiled(**inputs).logits
            torch.testing.assert_close(got, expected)
            outputs.append(got)
            frames.append(counter.frame_count)
    assert frames[0] > 0 and frames[1] == frames[0]
    assert not torch.allclose(outputs[0], outputs[1])  # the new masks were read
    q = prepared.get_buffer("model.layers.0.self_attn.q_proj.weight_mask")
    assert (q == 0).float().mean().item() == pytest.approx(0.75)


@pytest.mark.parametrize("name,scope", SCOPED)
def test_squash_save_pretrained_from_pretrained(models, name, scope, tmp_path):
    case, model = CASES[name], models[name]
    prepared, sparsifier = _prepare(model, case, scope)
    sparsifier.step()
    fqns = _configured(sparsifier)
    masks = {fqn: prepared.get_buffer(f"{fqn}_mask").clone() for fqn in fqns}
    prepared.eval()
    inputs = _inputs(case, *SHAPES[0], seed=3)
    with torch.no_grad():
        expected = _call(case, prepared, scope, inputs).logits

    squashed = sparsifier.squash_mask()
    assert squashed is prepared and isinstance(squashed, type(model))
    assert not [n for n, m in squashed.named_modules() if isinstance(m, torch.fx.GraphModule)]
    assert not [k for k in squashed.state_dict() if k.endswith("_mask")]
    assert [type(m) for m in squashed.modules()] == [type(m) for m in model.modules()]  # the original classes
    for fqn, mask in masks.items():
        assert torch.equal(squashed.get_parameter(fqn) == 0, mask == 0), fqn
    if name == "gpt2":
        assert squashed.lm_head.weight is squashed.transformer.wte.weight  # still tied
    squashed.eval()
    with torch.no_grad():
        logits = squashed(**inputs).logits  # any call: the plain model takes the cache again
    torch.testing.assert_close(logits, expected, rtol=1e-5, atol=1e-5)

    squashed.save_pretrained(tmp_path)
    loaded, info = type(model).from_pretrained(tmp_path, output_loading_info=True)
    assert not info["missing_keys"] and not info["unexpected_keys"] and not info.get("mismatched_keys"), info
    loaded.eval()
    with torch.no_grad():
        torch.testing.assert_close(loaded(**inputs).logits, logits, rtol=0, atol=1e-6)
    for fqn, mask in masks.items():
        weight = loaded.get_parameter(fqn)
        assert torch.equal(weight == 0, mask == 0), fqn
        assert torch.equal(weight, squashed.get_parameter(fqn)), fqn


def test_block_scope_traced_without_padding_refuses_a_padding_mask_later(models):
    """Traced where the attention mask reached the block as None, the graph has no mask input: a padding mask
    later is refused (not silently ignored)."""
    case, model = CASES["llama"], models["llama"]
    unpadded = {"input_ids": torch.randint(3, VOCAB, SHAPES[0]), "use_cache": False}
    block = fxs.prepare_fx_sparse(model, _sparsifier(0.0), scope=case.block, tracer="export",
                                  example_inputs=unpadded)
    block.eval()
    padded = _inputs(case, *SHAPES[1], seed=4)
    with torch.no_grad(), pytest.raises(fxs.TraceError, match=r"\['attention_mask'\] was None"):
        block(**padded, use_cache=False)
