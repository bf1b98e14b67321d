"""Checkpoints that verify themselves (`circuits.models.save` / `load`): bit-exact round trips for every kind of
model the library supports, and every kind of damage refused with an error naming the file and the problem."""

from __future__ import annotations

import json
import warnings

import pytest
import torch
from safetensors.torch import load_file, save_file
from transformer_lens import TransformerBridge
from transformer_lens.config import TransformerBridgeConfig

from circuits.models import ModelSpec, attn_only, build, load, random_gemma, random_gpt2, save


def _word_tokenizer(d_vocab: int, name: str):
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    tk = Tokenizer(models.WordLevel({f"w{i}": i for i in range(d_vocab)}, unk_token="w0"))
    tk.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok = PreTrainedTokenizerFast(tokenizer_object=tk, bos_token="w0", eos_token="w0", unk_token="w0", pad_token="w0")
    tok.init_kwargs["name_or_path"] = name
    tok.init_kwargs["add_bos_token"] = True
    return tok


def _hf_bridge(kind: str, name: str):
    """A small random GPT-NeoX (partial rotary) or LLaMA (RMSNorm, grouped-query attention) bridge."""
    import transformers

    shape = dict(vocab_size=40, hidden_size=32, num_hidden_layers=2, num_attention_heads=4, intermediate_size=64,
                 max_position_embeddings=16)
    if kind == "neox":
        config, model_class = transformers.GPTNeoXConfig(**shape, rotary_pct=0.5), transformers.GPTNeoXForCausalLM
    else:
        config, model_class = transformers.LlamaConfig(**shape, num_key_value_heads=2), transformers.LlamaForCausalLM
    torch.manual_seed(0)
    hf = model_class(config).eval()
    return TransformerBridge.boot_transformers(name, hf_model=hf, tokenizer=_word_tokenizer(40, f"local-{kind}")).eval()


def _native(norm):
    cfg = TransformerBridgeConfig(n_layers=2, d_model=16, n_ctx=8, d_head=4, n_heads=4, d_vocab=12, attn_only=False,
                                  d_mlp=32, act_fn="gelu", normalization_type=norm, seed=3)
    return TransformerBridge.boot_native(cfg).eval()


MODELS = {
    "attn2l-ln": lambda: attn_only(2, 16, 4, 4, d_vocab=12, n_ctx=8, seed=1),
    "attn0l": lambda: attn_only(0, 16, 4, 4, d_vocab=12, n_ctx=8, seed=1),
    "mlp-gelu": lambda: build(ModelSpec(1, 16, 4, 4, 12, 8, d_mlp=32, act_fn="gelu"), seed=2),
    "native-rms": lambda: _native("RMS"),
    "native-lnpre": lambda: _native("LNPre"),
    "native-no-norm": lambda: _native(None),
    "float64": lambda: attn_only(1, 16, 4, 4, d_vocab=12, n_ctx=8, seed=1).double(),
    "gpt2-bridge": lambda: random_gpt2(n_layers=2, d_model=32, n_heads=4, d_vocab=40, n_ctx=16),
    "neox-bridge": lambda: _hf_bridge("neox", "EleutherAI/pythia-14m"),
    "llama-bridge": lambda: _hf_bridge("llama", "meta-llama/Llama-3.2-1B"),
    # tied embeddings scaled by sqrt(24) (a float32-rounded buffer the checkpoint does not hold), one key/value head
    "gemma-bridge-float64": lambda: random_gemma(n_layers=2, d_model=24, n_heads=3, d_head=16, d_vocab=40, n_ctx=16,
                                                 dtype=torch.float64),
}


@pytest.mark.parametrize("name", list(MODELS))
def test_round_trip_is_bit_exact(tmp_path, name):
    model = MODELS[name]()
    folder = save(model, tmp_path / name)
    config = json.loads((folder / "config.json").read_text())
    assert config["format_version"] == 2 and len(config["weights_sha256"]) == 64
    loaded = load(folder)
    a, b = model.state_dict(), loaded.state_dict()
    assert set(a) == set(b)
    assert all(torch.equal(a[k], b[k]) and a[k].dtype == b[k].dtype for k in a)
    tokens = torch.randint(0, model.cfg.d_vocab, (2, 6))
    with torch.no_grad():
        assert torch.equal(model(tokens), loaded(tokens))
    if getattr(model, "spec", None) is not None:
        assert loaded.spec == model.spec


def test_tied_and_fused_weights_are_stored_once(tmp_path):
    model = random_gpt2(n_layers=1, d_model=32, n_heads=4, d_vocab=40, n_ctx=16)
    folder = save(model, tmp_path / "g")
    config = json.loads((folder / "config.json").read_text())
    assert config["aliases"] == {"unembed.weight": "embed.weight"}
    assert "unembed.weight" not in load_file(str(folder / "model.safetensors"))


def test_failed_save_leaves_nothing(tmp_path):
    model = attn_only(1, 16, 4, 4, d_vocab=12, n_ctx=8)
    with torch.no_grad():
        model.blocks[0].attn.q.weight[0, 0] = float("nan")
    with pytest.raises(ValueError, match=r"blocks\.0\.attn\.q\.weight.*NaN or infinite"):
        save(model, tmp_path / "m")
    assert list(tmp_path.iterdir()) == []


def test_resaving_over_a_checkpoint_replaces_it(tmp_path):
    save(random_gpt2(n_layers=1, d_model=32, n_heads=4, d_vocab=40, n_ctx=16), tmp_path / "m")
    model = attn_only(1, 16, 4, 4, d_vocab=12, n_ctx=8)
    loaded = load(save(model, tmp_path / "m"))
    assert sorted(p.name for p in (tmp_path / "m").iterdir()) == ["config.json", "model.safetensors"]
    assert loaded.spec == model.spec


@pytest.fixture
def folder(tmp_path):
    return save(attn_only(1, 16, 4, 4, d_vocab=12, n_ctx=8, seed=1), tmp_path / "m")


def _edit_config(folder, fn):
    config = json.loads((folder / "config.json").read_text())
    fn(config)
    (folder / "config.json").write_text(json.dumps(config))


def test_flipped_weight_bytes_are_refused(folder):
    weights = folder / "model.safetensors"
    data = bytearray(weights.read_bytes())
    data[-3] ^= 0x40
    weights.write_bytes(bytes(data))
    with pytest.raises(ValueError, match=r"model\.safetensors.*SHA-256.*changed or damaged"):
        load(folder)


def test_non_finite_weights_are_refused_on_load(folder):
    """A file with NaN weights and a matching checksum (written by hand, not by `save`)."""
    weights = folder / "model.safetensors"
    state = load_file(str(weights))
    state["embed.weight"][1, 2] = float("inf")
    save_file(state, str(weights))
    import hashlib

    _edit_config(folder, lambda c: c.update(weights_sha256=hashlib.sha256(weights.read_bytes()).hexdigest()))
    with pytest.raises(ValueError, match=r"model\.safetensors.*embed\.weight.*NaN or infinite"):
        load(folder)


@pytest.mark.parametrize("version", [0, 3, "2", None, True])
def test_unknown_format_version_is_refused(folder, version):
    _edit_config(folder, lambda c: c.update(format_version=version))
    with pytest.raises(ValueError, match=r"config\.json.*format_version.*unknown"):
        load(folder)


def test_config_of_another_model_with_the_same_shapes_is_refused(folder):
    """4 heads of 4 → 2 heads of 8: every tensor keeps its shape, the model computes something else."""
    def edit(c):
        c["spec"].update(n_heads=2, d_head=8)
        c["bridge_config"].update(n_heads=2, d_head=8)

    _edit_config(folder, edit)
    with pytest.raises(ValueError, match=r"computes other logits.*config does not match the weights"):
        load(folder)


def test_spec_and_bridge_config_must_agree(folder):
    _edit_config(folder, lambda c: c["spec"].update(n_heads=2, d_head=8))
    with pytest.raises(ValueError, match=r"config\.json.*spec and bridge_config.*d_head"):
        load(folder)


def test_changed_shapes_name_the_tensor(folder):
    def edit(c):
        c["spec"]["d_vocab"] = 13
        c["bridge_config"].update(d_vocab=13, d_vocab_out=13)

    _edit_config(folder, edit)
    with pytest.raises(ValueError, match=r"model\.safetensors.*embed\.weight.*shape"):
        load(folder)


def test_format_1_checkpoints_still_load_with_a_warning(folder):
    _edit_config(folder, lambda c: [c.pop(k) for k in ("bridge_config", "weights_sha256", "probe", "aliases",
                                                        "kind", "dtype")] and c.update(format_version=1))
    with pytest.warns(UserWarning, match="format_version 1"):
        model = load(folder)
    assert model.spec.n_heads == 4


def test_missing_or_malformed_files_are_named(folder, tmp_path):
    with pytest.raises(FileNotFoundError, match="nowhere"):
        load(tmp_path / "nowhere")
    (folder / "config.json").write_text("[1, 2]")
    with pytest.raises(ValueError, match=r"config\.json.*JSON object"):
        load(folder)
    (folder / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match=r"config\.json"):
        load(folder)


def test_no_warning_on_a_verified_load(folder):
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        load(folder)
