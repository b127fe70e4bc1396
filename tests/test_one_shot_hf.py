"""one_shot on Hugging Face decoders as users build them: default configs (KV cache on), eager and sdpa attention.

The reference prunes block ``i`` on inputs captured from a whole-model forward (``use_cache=False``) of
the model whose blocks before ``i`` are already pruned: what one_shot computes, without its propagation.
"""
import copy

import pytest
import torch
from torch import nn

import fx_sparsity as fxs
from fx_sparsity.passes import SharedProduct

transformers = pytest.importorskip("transformers")
pytestmark = pytest.mark.slow


def tiny(family, attn):
    if family == "llama":
        from transformers import LlamaConfig as Config
        from transformers import LlamaForCausalLM as Model
        from transformers.models.llama.modeling_llama import LlamaDecoderLayer as Layer
    else:
        from transformers import Qwen2Config as Config
        from transformers import Qwen2ForCausalLM as Model
        from transformers.models.qwen2.modeling_qwen2 import Qwen2DecoderLayer as Layer
    torch.manual_seed(0)
    config = Config(vocab_size=96, hidden_size=32, intermediate_size=64, num_hidden_layers=3, num_attention_heads=4,
                    num_key_value_heads=2, pad_token_id=0, bos_token_id=1, eos_token_id=2)
    config._attn_implementation = attn
    assert config.use_cache  # the default users get
    return Model(config).eval(), Layer


def calibration():
    g = torch.Generator().manual_seed(1)
    return [{"input_ids": torch.randint(3, 96, (2, 16), generator=g)} for _ in range(3)]


def reference(model, layer_type, make, batches, config=None):
    """Block by block, each block calibrated on what a whole no-cache forward of the partly pruned model gives it."""
    model = copy.deepcopy(model)
    model.config.use_cache = False
    layers = [(n, m) for n, m in model.named_modules() if isinstance(m, layer_type)]
    for name, layer in layers:
        names = None if config is None else [e["tensor_fqn"] for e in config if e["tensor_fqn"].startswith(name + ".")]
        if names == []:
            continue
        seen = []
        handle = layer.register_forward_pre_hook(lambda m, a, k: seen.append((a, dict(k))), with_kwargs=True)
        with torch.no_grad():
            for batch in batches:
                model(**batch)
        handle.remove()
        block_config = None if names is None else [{"tensor_fqn": n[len(name) + 1:]} for n in names]
        sparsifier = make()
        sparsifier.prepare(layer, block_config, scope="layers", inplace=True)
        with torch.no_grad():
            for args, kwargs in seen:
                layer(*args, **kwargs)
            sparsifier.step()
        sparsifier.squash_mask()
    return model


SPARSIFIERS = {"sparsegpt": lambda: fxs.SparseGPTSparsifier(0.5, block_size=16), "wanda": lambda: fxs.WandaSparsifier(0.5)}


@pytest.mark.parametrize("family", ["llama", "qwen2"])
@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_default_config_with_cache_equals_the_no_cache_reference(family, attn):
    model, layer_type = tiny(family, attn)
    batches = calibration()
    calls = []
    hooks = [m.register_forward_pre_hook(lambda m, a, k: calls.append(k), with_kwargs=True)
             for m in model.modules() if isinstance(m, layer_type)]
    head_calls = []
    hooks.append(model.lm_head.register_forward_hook(lambda *a: head_calls.append(1)))
    pruned = fxs.one_shot(model, SPARSIFIERS["sparsegpt"](), batches, scope=layer_type, progress=False)
    for h in hooks:
        h.remove()
    # no block ever got a cache (it would grow with every call), and the capture stopped before the head
    assert calls and all(not any("Cache" in type(v).__name__ for v in k.values()) for k in calls)
    assert head_calls == []
    assert model.config.use_cache  # the user's config is left as it was
    expected = reference(model, layer_type, SPARSIFIERS["sparsegpt"], batches)
    for key, value in expected.state_dict().items():
        torch.testing.assert_close(pruned.state_dict()[key], value, rtol=0, atol=0, msg=key)
    linears = [m for layer in pruned.modules() if isinstance(layer, layer_type)
               for m in layer.modules() if type(m) is nn.Linear]
    assert len(linears) == 21 and all((m.weight == 0).float().mean().item() == 0.5 for m in linears)


@pytest.mark.parametrize("method", ["sparsegpt", "wanda"])
def test_a_block_left_out_of_the_config_still_runs(method):
    model, layer_type = tiny("llama", "sdpa")
    batches = calibration()
    config = [{"tensor_fqn": f"model.layers.{i}.{proj}.weight"} for i in (0, 2)
              for proj in ("self_attn.q_proj", "mlp.down_proj")]
    pruned = fxs.one_shot(model, SPARSIFIERS[method](), batches, scope=layer_type, config=config, progress=False)
    expected = reference(model, layer_type, SPARSIFIERS[method], batches, config)
    for key, value in expected.state_dict().items():
        torch.testing.assert_close(pruned.state_dict()[key], value, rtol=0, atol=0, msg=key)
    assert (pruned.model.layers[2].mlp.down_proj.weight == 0).float().mean().item() == 0.5
    assert (pruned.model.layers[1].mlp.down_proj.weight == 0).float().mean().item() == 0.0


def test_linears_reading_one_input_share_its_gram_product(monkeypatch):
    """q/k/v read one activation and gate/up another: 4 products per block call for 7 linears, same grams."""
    model, layer_type = tiny("llama", "sdpa")
    puts = []
    original = SharedProduct.put
    monkeypatch.setattr(SharedProduct, "put", lambda self, x, p: (puts.append(x.shape), original(self, x, p)))
    layer = model.model.layers[0]
    sparsifier = fxs.SparseGPTSparsifier(0.5)
    prepared = fxs.prepare_fx_sparse(layer, sparsifier, scope="layers")
    x = torch.randn(2, 16, 32)
    position = model.model.rotary_emb(x, torch.arange(16)[None])
    with torch.no_grad():
        prepared(x, position_embeddings=position, attention_mask=None)
    assert len(puts) == 4
    grams = {name: prepared.get_submodule(f"{name}.weight_input_observer").gram
             for name in ("self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj")}
    assert grams["self_attn.q_proj"].dtype == torch.float32
    assert torch.equal(grams["self_attn.q_proj"], grams["self_attn.k_proj"])
    assert torch.equal(grams["self_attn.q_proj"], grams["self_attn.v_proj"])
    sparsifier.step()  # frees the held product first
    assert sparsifier._shared_product.product is None
