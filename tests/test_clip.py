"""CLIP text encoders and tokenizer vs transformers (PyTorch), on tiny random configs."""

import json
import subprocess
import sys

import numpy as np
import pytest

from tests.conftest import max_abs

TOL = 1e-5
WORDS = ["a", "photo", "of", "cat", "dog", "astronaut", "riding", "horse", "on", "mars"]


def _torch_model(tmp, *, act, eos, proj, seed, layers=2, hidden=32):
    import torch
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    torch.manual_seed(seed)
    cfg = CLIPTextConfig(vocab_size=1000, hidden_size=hidden, intermediate_size=2 * hidden,
                         num_hidden_layers=layers, num_attention_heads=4, max_position_embeddings=77,
                         hidden_act=act, eos_token_id=eos, bos_token_id=998, pad_token_id=1, projection_dim=24)
    cls = CLIPTextModelWithProjection if proj else CLIPTextModel
    m = cls(cfg).eval()
    with torch.no_grad():  # random LN/bias params so every leaf is exercised
        for n, p in m.named_parameters():
            if "layer_norm" in n and n.endswith("weight"):
                p.copy_(1 + 0.1 * torch.randn_like(p))
            elif n.endswith("bias"):
                p.copy_(0.1 * torch.randn_like(p))
    m.save_pretrained(tmp, safe_serialization=True)
    return m


def _ids(eos, b=3, t=77, seed=0):
    """BOS, random words, EOS, then EOS padding (SD1-style).

    Legacy ``eos_token_id == 2`` configs pool at argmax(ids), so there EOS (999) is the largest id, as in CLIP's
    vocab. With a real eos id (500) random words above 500 come before it, so argmax pooling would be wrong.
    """
    rng = np.random.default_rng(seed)
    e = 999 if eos == 2 else eos
    ids = rng.integers(3, 990, size=(b, t)).astype(np.int64)
    ids[ids == e] = e + 1
    ids[:, 0] = 998 if eos == 2 else 3
    for i, n in enumerate([5, 12, 76][:b]):
        ids[i, n:] = e
    if eos != 2:
        assert (ids.argmax(-1) != (ids == eos).argmax(-1)).all()
    return ids


def _torch_run(m, ids):
    import torch

    with torch.no_grad():
        return m(input_ids=torch.from_numpy(ids), output_hidden_states=True)


@pytest.mark.parametrize("act,eos,proj", [("quick_gelu", 2, False), ("gelu", 2, True), ("gelu", 500, True),
                                          ("quick_gelu", 500, False)])
def test_clip_parity(tmp_path, act, eos, proj):
    from jaxdiff.clip import apply_clip_text
    from weights_convert.components import load_component

    m = _torch_model(tmp_path, act=act, eos=eos, proj=proj, seed=1, layers=3)
    cfg, params = load_component(tmp_path, "text_encoder")
    assert cfg.hidden_act == act and cfg.eos_token_id == eos and cfg.with_projection == proj
    ids = _ids(eos)
    ref = _torch_run(m, ids)
    last, aux = apply_clip_text(params, ids, config=cfg, output_hidden_states=True)
    assert max_abs(last, ref.last_hidden_state.numpy(), "last_hidden_state") <= TOL
    assert len(aux["hidden_states"]) == len(ref.hidden_states) == 4
    for i, (a, b) in enumerate(zip(aux["hidden_states"], ref.hidden_states)):
        assert max_abs(a, b.numpy(), f"hidden_states[{i}]") <= TOL
    assert max_abs(aux["penultimate"], ref.hidden_states[-2].numpy(), "penultimate") <= TOL
    if proj:
        assert max_abs(aux["text_embeds"], ref.text_embeds.numpy(), "text_embeds") <= TOL
        # pooled: recompute transformers' rule from its own last_hidden_state
        pos = ids.argmax(-1) if eos == 2 else (ids == eos).argmax(-1)
        ref_pooled = ref.last_hidden_state.numpy()[np.arange(len(ids)), pos]
    else:
        ref_pooled = ref.pooler_output.numpy()
    assert max_abs(aux["pooled"], ref_pooled, "pooled") <= TOL
    # jit with the (hashable, frozen) config static gives the same result
    import functools

    import jax

    jl, jaux = jax.jit(functools.partial(apply_clip_text, config=cfg))(params, ids)
    assert np.abs(np.asarray(jl) - np.asarray(last)).max() <= TOL
    assert np.abs(np.asarray(jaux["pooled"]) - np.asarray(aux["pooled"])).max() <= TOL


def test_legacy_prefixed_checkpoint_loads(tmp_path):
    """Real SD checkpoints: ``text_model.*`` keys and a ``position_ids`` buffer."""
    from safetensors.numpy import save_file

    from jaxdiff.clip import apply_clip_text
    from tests.conftest import torch_state_dict
    from weights_convert.components import load_component

    m = _torch_model(tmp_path, act="quick_gelu", eos=2, proj=False, seed=2)
    sd = {("text_model." + k if not k.startswith("text_model.") else k): v for k, v in torch_state_dict(m).items()}
    sd["text_model.embeddings.position_ids"] = np.arange(77, dtype=np.int64)[None]
    (tmp_path / "model.safetensors").unlink()
    save_file({k: np.ascontiguousarray(v) for k, v in sd.items()}, str(tmp_path / "model.safetensors"))
    cfg, params = load_component(tmp_path, "text_encoder")
    ids = _ids(2)
    last, _ = apply_clip_text(params, ids, config=cfg)
    assert max_abs(last, _torch_run(m, ids).last_hidden_state.numpy(), "legacy last_hidden_state") <= TOL


def test_encode_prompt_sdxl(tmp_path):
    import torch

    from jaxdiff.clip import encode_prompt_sdxl
    from weights_convert.components import load_component

    m1 = _torch_model(tmp_path / "te1", act="quick_gelu", eos=2, proj=False, seed=3, hidden=32)
    m2 = _torch_model(tmp_path / "te2", act="gelu", eos=500, proj=True, seed=4, hidden=48)
    cfg1, p1 = load_component(tmp_path / "te1", "text_encoder")
    cfg2, p2 = load_component(tmp_path / "te2", "text_encoder")
    ids1, ids2 = _ids(2, b=2), _ids(500, b=2, seed=1)
    # diffusers StableDiffusionXLPipeline.encode_prompt (clip_skip None): hidden_states[-2] of each, concat;
    # pooled = encoder 2's output[0] (text_embeds)
    o1, o2 = _torch_run(m1, ids1), _torch_run(m2, ids2)
    ref_ctx = torch.concat([o1.hidden_states[-2], o2.hidden_states[-2]], dim=-1).numpy()
    ctx, pooled = encode_prompt_sdxl(p1, cfg1, p2, cfg2, ids1, ids2)
    assert ctx.shape == (2, 77, 80) and pooled.shape == (2, 24)
    assert max_abs(ctx, ref_ctx, "sdxl context") <= TOL
    assert max_abs(pooled, o2.text_embeds.numpy(), "sdxl pooled") <= TOL


def test_config_rejects_unsupported():
    from jaxdiff.clip import CLIPTextConfig

    with pytest.raises(ValueError, match="relu"):
        CLIPTextConfig.from_diffusers({"hidden_act": "relu", "architectures": ["CLIPTextModel"]})
    with pytest.raises(ValueError, match="BertModel"):
        CLIPTextConfig.from_diffusers({"architectures": ["BertModel"]})


# ------------------------------------------------------------------------------------------- tokenizer
@pytest.fixture
def tok_folder(tmp_path):
    from jaxdiff.vocab import write_clip_vocab

    return write_clip_vocab(tmp_path / "tok", WORDS)


def test_tokenizer_matches_transformers(tok_folder):
    from transformers import CLIPTokenizer

    from jaxdiff.tokenizer import load_tokenizer, tokenize

    tok = load_tokenizer(tok_folder)
    ref = CLIPTokenizer.from_pretrained(str(tok_folder), model_max_length=77)
    prompts = ["a photo of a cat", "An astronaut riding a horse on Mars!", "zebra"]
    ids = tokenize(tok, prompts)
    assert ids.dtype == np.int32 and ids.shape == (3, 77)
    exp = ref(prompts, padding="max_length", max_length=77, truncation=True)["input_ids"]
    np.testing.assert_array_equal(ids, np.asarray(exp))
    vocab = json.loads((tok_folder / "vocab.json").read_text())
    bos, eos = vocab["<|startoftext|>"], vocab["<|endoftext|>"]
    n = len(ref("a photo of a cat")["input_ids"])
    assert n == 7  # every listed word is one token
    assert ids[0, 0] == bos and ids[0, n - 1] == eos and (ids[0, n:] == tok.pad_token_id).all()
    assert tok.pad_token_id == eos  # SD1-style: pads with EOS


def test_tokenizer_own_pad_token(tmp_path):
    """SDXL's tokenizer_2 pads with '!' (id 0 in the real vocab): the tokenizer's own pad token is used."""
    from jaxdiff.tokenizer import load_tokenizer, tokenize
    from jaxdiff.vocab import write_clip_vocab

    folder = write_clip_vocab(tmp_path / "tok2", WORDS, pad_token="!")
    bang = json.loads((folder / "vocab.json").read_text())["!"]
    tok = load_tokenizer(folder)
    ids = tokenize(tok, "a cat")
    assert tok.pad_token_id == bang != tok.eos_token_id
    assert ids[0, 3] == tok.eos_token_id and (ids[0, 4:] == bang).all()


def test_tokenizer_json_only_folder(tok_folder, tmp_path):
    """A folder with only ``tokenizer.json`` (what transformers 5 saves) loads and tokenizes the same."""
    from jaxdiff.tokenizer import load_tokenizer, tokenize

    tok = load_tokenizer(tok_folder)
    tok.save_pretrained(str(tmp_path / "saved"))
    for n in ("vocab.json", "merges.txt"):
        (tmp_path / "saved" / n).unlink(missing_ok=True)
    assert (tmp_path / "saved" / "tokenizer.json").is_file()
    tok2 = load_tokenizer(tmp_path / "saved")
    prompts = ["a photo of a dog riding a horse", "xyz"]
    np.testing.assert_array_equal(tokenize(tok2, prompts), tokenize(tok, prompts))


def test_prompt_too_long(tok_folder):
    from jaxdiff.tokenizer import PromptTooLongError, load_tokenizer, tokenize

    tok = load_tokenizer(tok_folder)
    long = " ".join(["cat"] * 80)
    with pytest.raises(PromptTooLongError, match=r"82 tokens.*limit is 77") as e:
        tokenize(tok, ["dog", long])
    assert "cat cat" in str(e.value) and "..." in str(e.value)
    ids = tokenize(tok, long, truncate=True)
    assert ids.shape == (1, 77) and ids[0, -1] == tok.eos_token_id


def test_tokenizer_missing_folder(tmp_path):
    from jaxdiff.tokenizer import TokenizerError, load_tokenizer

    with pytest.raises(TokenizerError, match="does not exist"):
        load_tokenizer(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(TokenizerError, match="no vocabulary"):
        load_tokenizer(tmp_path / "empty")


def test_imports_do_not_pull_torch():
    code = "import jaxdiff.clip, jaxdiff.tokenizer, sys; assert 'torch' not in sys.modules, 'torch imported'"
    r = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
