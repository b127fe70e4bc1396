"""Structured pruning of Hugging Face transformers (tiny random configs, no download): BERT and Llama with
grouped-query attention, traced with torch.export, whole model or block by block. Heads, MLP widths and the hidden
width (across the blocks too) are cut;
the pruned model computes what the masked one does, keeps its class (block scope), runs on other shapes,
compiles, exports, and its config says the new sizes so save_pretrained / from_pretrained round-trips."""
import warnings

import pytest
import torch

import fx_sparsity as fxs

pytestmark = [pytest.mark.slow, pytest.mark.filterwarnings("ignore:.*:FutureWarning"),
              pytest.mark.filterwarnings("ignore:.*:DeprecationWarning")]

transformers = pytest.importorskip("transformers")
warnings.filterwarnings("ignore", module="transformers")

from transformers.models.bert.modeling_bert import BertLayer  # noqa: E402
from transformers.models.llama.modeling_llama import LlamaDecoderLayer  # noqa: E402


def params(module):
    return sum(p.numel() for p in module.parameters())


def llama():
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                      pad_token_id=0, bos_token_id=1, eos_token_id=2)
    return transformers.LlamaForCausalLM(config).eval()


def bert():
    torch.manual_seed(0)
    config = transformers.BertConfig(vocab_size=100, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                                     intermediate_size=64, max_position_embeddings=32, num_labels=3)
    return transformers.BertForSequenceClassification(config).eval()


def inputs(batch=2, length=8, padded=True, cache=True):
    ids = torch.randint(3, 100, (batch, length))
    mask = torch.ones_like(ids)
    if padded:
        mask[-1, length - 2:] = 0
    out = {"input_ids": ids, "attention_mask": mask}
    if not cache:
        out["use_cache"] = False
    return out


def logits(out):
    return out.logits if hasattr(out, "logits") else out[0]


def prune(model, scope, example, config=None, **options):
    pruner = fxs.SaliencyPruner(0.5, **options)
    masked = fxs.prepare_fx_sparse(model, pruner, config, scope=scope, tracer="export", example_inputs=example)
    pruner.step()
    return pruner, masked, pruner.prune()


def test_llama_gqa_keeps_query_heads_with_their_kv_head():
    pruner, masked, pruned = prune(llama(), "model", inputs(cache=False), prune_normalized=False)
    heads = pruner.targets["model.layers.0.self_attn.q_proj.weight"].channel_group
    assert heads.producers == [("model.layers.0.self_attn.q_proj.weight", 0), ("model.layers.0.self_attn.k_proj.weight", 0),
                               ("model.layers.0.self_attn.v_proj.weight", 0)]
    assert heads.channels_per_class == [32, 32]  # a class: one kv head and its 2 query heads of 16
    mlp = pruner.targets["model.layers.0.mlp.gate_proj.weight"].channel_group
    assert mlp.producers == [("model.layers.0.mlp.gate_proj.weight", 0), ("model.layers.0.mlp.up_proj.weight", 0)]
    assert not any(g["tensor_fqn"] == "model.embed_tokens.weight" for g in pruner.groups)  # the hidden width stays
    layer = "model.layers.1.self_attn"
    assert pruned.get_parameter(f"{layer}.q_proj.weight").shape == (32, 64)
    assert pruned.get_parameter(f"{layer}.k_proj.weight").shape == (16, 64)
    assert pruned.get_parameter(f"{layer}.o_proj.weight").shape == (64, 32)
    assert pruned.get_parameter("model.layers.1.mlp.down_proj.weight").shape == (64, 64)
    example = inputs(cache=False)
    torch.testing.assert_close(logits(pruned(**example)), logits(masked(**example)), rtol=1e-5, atol=1e-5)
    other = inputs(3, 13, cache=False)  # export keeps batch and sequence dynamic
    torch.testing.assert_close(logits(pruned(**other)), logits(masked(**other)), rtol=1e-5, atol=1e-5)
    assert params(pruned) < 0.7 * params(llama())


def test_llama_block_scope_keeps_the_model_class_and_its_config(tmp_path):
    model = llama()
    pruner, masked, pruned = prune(model, LlamaDecoderLayer, inputs(cache=False),  # blocks export without a cache
                                   prune_normalized=False)  # (the hidden width: test_norm_widths.py)
    assert type(pruned) is transformers.LlamaForCausalLM
    assert all(type(layer) is LlamaDecoderLayer for layer in pruned.model.layers)  # the blocks' own class back
    config = pruned.config
    assert (config.num_attention_heads, config.num_key_value_heads, config.head_dim, config.intermediate_size,
            config.hidden_size) == (2, 1, 16, 64, 64)
    assert model.config.num_attention_heads == 4  # the user's model keeps its own
    example = inputs(cache=False)
    torch.testing.assert_close(logits(pruned(**example)), logits(masked(**example)), rtol=1e-5, atol=1e-5)
    prompt = torch.tensor([[1, 5, 9, 12]])
    generated = pruned.generate(prompt, max_new_tokens=4, min_new_tokens=4, do_sample=False)  # with the KV cache: the class's own code
    assert generated.shape == (1, 8)
    pruned.save_pretrained(tmp_path)
    reloaded = transformers.LlamaForCausalLM.from_pretrained(tmp_path).eval()
    assert params(reloaded) == params(pruned)
    torch.testing.assert_close(logits(reloaded(**example)), logits(pruned(**example)))


def tied_llama(tied):
    """The Llama above, its LM head tied to its embeddings or not."""
    torch.manual_seed(0)
    config = transformers.LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64,
                                      pad_token_id=0, bos_token_id=1, eos_token_id=2, tie_word_embeddings=tied)
    return transformers.LlamaForCausalLM(config).eval()


def _ids(batch=2, length=8):
    return {"input_ids": torch.randint(3, 128, (batch, length)), "use_cache": False}


@pytest.mark.parametrize("tied", [False, True], ids=["untied", "tied"])
def test_a_decoder_block_by_block_cuts_its_hidden_size(tied, tmp_path):
    """The hidden width is one group across the model (embeddings, every block's projections and norms, the final
    norm, the LM head), joined through the model's own code between the blocks; the class, its config and tied
    weights stay true; fine-tuned with the masks, the pruned model computes what the masked one does."""
    from transformers.models.llama.modeling_llama import LlamaRMSNorm

    model = tied_llama(tied)
    pruner = fxs.SaliencyPruner(0.5)
    example = _ids(batch=1)  # a batch of one: exported on it repeated, so the batch stays dynamic
    masked = fxs.prepare_fx_sparse(model, pruner, scope=LlamaDecoderLayer, tracer="export", example_inputs=example)
    hidden = pruner.targets["model.embed_tokens.weight"].channel_group
    assert {"model.layers.0.self_attn.o_proj.weight", "model.layers.1.mlp.down_proj.weight"} <= {
        fqn for fqn, _ in hidden.producers}  # one group from the embeddings through every block
    head = set() if tied else {"lm_head.weight"}  # (tied: the embeddings' tensor, named once)
    assert {"model.norm.weight", "model.layers.1.input_layernorm.weight", *head} <= {fqn for fqn, _ in hidden.tensors}
    masks = [k for k in masked.state_dict() if "mask" in k]
    assert "model.embed_tokens.out_channel_mask" in masks and len(masks) == 5  # once, read by every unit
    pruner.step()
    masked.train()  # a few steps of fine-tuning with the masks
    optimizer = torch.optim.AdamW(masked.parameters(), lr=1e-3)
    for _ in range(2):
        loss = masked(**_ids(4), labels=_ids(4)["input_ids"]).loss
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    masked.eval()
    pruned = pruner.prune().eval()
    assert type(pruned) is transformers.LlamaForCausalLM and pruned.config.hidden_size == 32
    assert all(type(layer) is LlamaDecoderLayer for layer in pruned.model.layers)
    assert type(pruned.model.norm) is LlamaRMSNorm and type(pruned.model.embed_tokens) is torch.nn.Embedding
    assert pruned.model.embed_tokens.weight.shape == (128, 32) and pruned.lm_head.in_features == 32
    assert (pruned.lm_head.weight is pruned.model.embed_tokens.weight) == tied
    assert params(pruned) <= 0.45 * params(model)
    assert model.config.hidden_size == 64  # the user's model keeps its own
    other = _ids(3, 11)
    ours, theirs = masked(**other).logits, pruned(**other).logits
    assert ((ours - theirs).abs().max() / ours.abs().max()).item() <= 1e-4
    generated = pruned.generate(torch.tensor([[1, 5, 9, 12]]), max_new_tokens=4, min_new_tokens=4, do_sample=False)
    assert generated.shape == (1, 8)
    pruned.save_pretrained(tmp_path)
    reloaded = transformers.LlamaForCausalLM.from_pretrained(tmp_path).eval()
    assert params(reloaded) == params(pruned)
    torch.testing.assert_close(reloaded(**other).logits, pruned(**other).logits)
    whole = fxs.SaliencyPruner(0.5, prune_normalized=False)  # the hidden size kept
    fxs.prepare_fx_sparse(model, whole, scope=LlamaDecoderLayer, tracer="export", example_inputs=_ids())
    assert "model.embed_tokens.weight" not in whole.targets and len(whole.groups) == 4


def test_llama_residual_width_is_pruned_exactly_when_named():
    pruner = fxs.SaliencyPruner(0.25, prune_normalized=False)
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)  # the masked RMSNorms average over the kept channels: exact
        masked = fxs.prepare_fx_sparse(llama(), pruner, [{"tensor_fqn": "model.embed_tokens.weight"}],
                                       tracer="export", example_inputs=inputs(cache=False))
    assert pruner.targets["model.embed_tokens.weight"].channel_group.normalized.startswith("LlamaRMSNorm")
    pruner.step()
    pruned = pruner.prune()
    assert pruned.get_parameter("model.embed_tokens.weight").shape == (128, 48)
    assert pruned.get_parameter("model.norm.weight").shape == (48,)
    example = inputs(3, 11, cache=False)
    torch.testing.assert_close(logits(pruned(**example)), logits(masked(**example)), rtol=1e-5, atol=1e-5)


def test_bert_heads_and_intermediate_widths():
    pruner, masked, pruned = prune(bert(), "model", inputs(), prune_normalized=False)
    tensors = sorted(g["tensor_fqn"] for g in pruner.groups)
    assert tensors == ["bert.encoder.layer.0.attention.self.query.weight",
                       "bert.encoder.layer.0.intermediate.dense.weight",
                       "bert.encoder.layer.1.attention.self.query.weight",
                       "bert.encoder.layer.1.intermediate.dense.weight", "bert.pooler.dense.weight"]
    heads = pruner.targets[pruner.groups[0]["tensor_fqn"]].channel_group
    assert heads.channels_per_class == [8, 8, 8, 8]
    example, other = inputs(), inputs(3, 11)
    torch.testing.assert_close(logits(pruned(**example)), logits(masked(**example)), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(logits(pruned(**other)), logits(masked(**other)), rtol=1e-5, atol=1e-5)
    assert pruned.get_parameter("bert.encoder.layer.0.attention.self.value.weight").shape == (16, 32)


def test_bert_block_scope_restores_bert_layers_and_says_what_its_config_cannot(tmp_path):
    with pytest.warns(UserWarning, match=r"BertForSequenceClassification.config cannot describe num_attention_heads=2 "
                                         r"\(the config derives the head size from hidden_size\)"):
        pruner, masked, pruned = prune(bert(), BertLayer, inputs(), prune_normalized=False)
    layer = pruned.bert.encoder.layer[0]
    assert type(layer) is BertLayer
    assert (layer.attention.self.num_attention_heads, layer.attention.self.all_head_size) == (2, 16)
    assert pruned.config.intermediate_size == 32
    example = inputs(3, 6)
    torch.testing.assert_close(logits(pruned(**example)), logits(masked(**example)), rtol=1e-5, atol=1e-5)
    # with the hidden width cut too (embeddings, every layer, the pooler), hidden_size / heads is the head size
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        pruner, masked, pruned = prune(bert(), BertLayer, inputs())
    assert (pruned.config.hidden_size, pruned.config.num_attention_heads) == (16, 2)
    assert type(pruned.bert.encoder.layer[1]) is BertLayer and type(pruned.bert.embeddings).__name__ == "BertEmbeddings"
    torch.testing.assert_close(logits(pruned(**example)), logits(masked(**example)), rtol=1e-5, atol=1e-5)
    pruned.save_pretrained(tmp_path)
    reloaded = transformers.BertForSequenceClassification.from_pretrained(tmp_path).eval()
    torch.testing.assert_close(logits(reloaded(**example)), logits(pruned(**example)))


@pytest.mark.parametrize("make", [bert, llama], ids=["bert", "llama"])
def test_pruned_transformers_compile_and_export(make):
    example = inputs(cache=make is bert)
    _, _, pruned = prune(make(), "model", example)
    expected = logits(pruned(**example))
    compiled = torch.compile(pruned, backend="aot_eager")
    torch.testing.assert_close(logits(compiled(**example)), expected, rtol=1e-4, atol=1e-4)
    exported = torch.export.export(pruned, (), example).module()
    torch.testing.assert_close(logits(exported(**example)), expected, rtol=1e-5, atol=1e-5)


def test_gpt2_fused_qkv_conv1d_and_tied_embeddings():
    from transformers.models.gpt2.modeling_gpt2 import GPT2Block

    torch.manual_seed(0)
    config = transformers.GPT2Config(vocab_size=100, n_embd=32, n_layer=2, n_head=4, n_positions=32, bos_token_id=0,
                                     eos_token_id=0)
    model = transformers.GPT2LMHeadModel(config).eval()
    example = {"input_ids": torch.randint(0, 100, (2, 8)), "use_cache": False}
    pruner, masked, pruned = prune(model, "model", example)
    heads = pruner.targets["transformer.h.0.attn.c_attn.weight"].channel_group
    assert heads.producers == [("transformer.h.0.attn.c_attn.weight", 1)]  # Conv1D: (in, out), q, k, v side by side
    assert heads.channels_per_class == [24] * 4
    torch.testing.assert_close(pruned(**example).logits, masked(**example).logits, rtol=1e-5, atol=1e-5)
    with pytest.warns(UserWarning, match="config cannot describe num_attention_heads=2"):
        _, masked, pruned = prune(model, GPT2Block, example)
    block = pruned.transformer.h[0]
    assert type(block) is GPT2Block and (block.attn.num_heads, block.attn.split_size, block.attn.c_attn.nf) == \
        (2, 16, 48)
    torch.testing.assert_close(pruned(**example).logits, masked(**example).logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family", ["gptj", "phi3", "qwen2"])
def test_the_config_says_the_cut_widths_so_from_pretrained_rebuilds_the_pruned_model(family, tmp_path):
    """Each config change is checked by building the class from the config: GPT-J's n_inner (None before),
    Phi-3's fused gate_up_proj, Qwen2's head_dim (not a config field before)."""
    torch.manual_seed(0)
    if family == "gptj":
        from transformers.models.gptj.modeling_gptj import GPTJBlock as block
        model = transformers.GPTJForCausalLM(transformers.GPTJConfig(vocab_size=128, n_embd=32, n_layer=2, n_head=4,
                                                                     rotary_dim=4, n_positions=64))
    elif family == "phi3":
        from transformers.models.phi3.modeling_phi3 import Phi3DecoderLayer as block
        model = transformers.Phi3ForCausalLM(transformers.Phi3Config(
            vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=4, pad_token_id=0, bos_token_id=1, eos_token_id=2, max_position_embeddings=64))
    else:
        from transformers.models.qwen2.modeling_qwen2 import Qwen2DecoderLayer as block
        model = transformers.Qwen2ForCausalLM(transformers.Qwen2Config(
            vocab_size=128, hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
            num_key_value_heads=2, pad_token_id=0, bos_token_id=1, eos_token_id=2))
    model.eval()
    ids = torch.randint(3, 128, (2, 8))
    example = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "use_cache": False}
    # GPT-J's config derives its attention width from n_embd, and its heads (rotary on every other channel) stay:
    # its hidden width stays too, or the config could not describe the model
    pruner = fxs.SaliencyPruner(0.5, prune_normalized=family != "gptj")
    fxs.prepare_fx_sparse(model, pruner, scope=block, tracer="export", example_inputs=example)
    pruner.step()
    with warnings.catch_warnings():
        warnings.simplefilter("error", UserWarning)
        pruned = pruner.prune()
    pruned.save_pretrained(tmp_path)
    reloaded = type(pruned).from_pretrained(tmp_path).eval()
    torch.testing.assert_close(reloaded(**example).logits, pruned(**example).logits)
