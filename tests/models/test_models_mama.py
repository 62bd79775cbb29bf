"""MamaModel (tiny preset): features as method.md §2 defines them, frozen parts, checkpointing, persistence."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from mama_ray import config
from mama_ray.data import captions
from mama_ray.data.tokenizer import build_tiny_tokenizer, token_arrays
from mama_ray.losses import MamaObjective
from mama_ray.models import MamaModel, build_model
from mama_ray.models.text import gather_sentences, pool_text

FIELDS = captions.CaptionFields("MG Diagnostic Left", "diagnostic", 61, "White", None, "L", "MLO", 4,
                                "S", "irregular", "high density")
TEXTS = [
    captions.to_model_text(captions.caption_text(FIELDS)),  # 10 sentences
    captions.to_model_text("The breast is extremely dense."),  # 1 sentence
    captions.to_model_text("Findings: a benign finding is present. Overall Assessment: Benign."),  # 2
]


@pytest.fixture(scope="module")
def tok():
    return build_tiny_tokenizer()


@pytest.fixture(scope="module")
def cfg():
    return config.from_dict({"model": {"preset": "tiny"}, "loss": {"late_loss_step": 0}})


def make_model(cfg, tok, seed: int = 0, **overrides) -> MamaModel:
    torch.manual_seed(seed)
    return build_model(config.override(cfg, overrides) if overrides else cfg, tok)


def batch(tok, seed: int = 1):
    g = torch.Generator().manual_seed(seed)
    enc = {k: torch.from_numpy(v) for k, v in token_arrays(tok, TEXTS, 144).items()}
    images = [torch.randint(0, 256, (3, 3, 64, 64), dtype=torch.uint8, generator=g) for _ in range(2)]
    return images[0], images[1], enc


def test_forward_features_shapes_and_norms(cfg, tok):
    model = make_model(cfg, tok)
    img, _, enc = batch(tok)
    out = model(img, enc["input_ids"], enc["attention_mask"], enc["sep_mask"])
    assert out["image_emb"].shape == (3, 32) and out["text_emb"].shape == (3, 32)
    assert out["patch_emb"].shape == (3, 64, 32)  # (64/8)² patches
    assert out["sent_emb"].shape == (3, 10, 32) and out["pooled_image"].shape == (3, 32)
    assert out["sent_mask"].sum(1).tolist() == [10, 1, 2]
    for k in ("image_emb", "text_emb"):
        torch.testing.assert_close(out[k].norm(dim=-1), torch.ones(3))
    torch.testing.assert_close(out["patch_emb"].norm(dim=-1), torch.ones(3, 64))
    norms = out["sent_emb"].norm(dim=-1)
    torch.testing.assert_close(norms[out["sent_mask"]], torch.ones(13))  # single-sentence row too
    assert norms[~out["sent_mask"]].abs().max().item() == 0.0
    assert out["logit_scale"].shape == (1,) and out["local_scale"].shape == (1,)
    assert out["logit_scale"].item() == pytest.approx(math.log(1 / 0.07))


def test_uint8_images_are_normalised_inside(cfg, tok):
    model = make_model(cfg, tok).eval()
    img, _, _ = batch(tok)
    with torch.no_grad():
        a = model.encode_image(img)
        b = model.encode_image((img.float() / 255 - 0.5) / 0.5)
        gray = model.encode_image(img[:, :1])  # one gray channel is replicated to RGB
    for k in a:
        torch.testing.assert_close(a[k], b[k])
    img3 = img[:, :1].expand(-1, 3, -1, -1)
    with torch.no_grad():
        torch.testing.assert_close(gray["image_emb"], model.encode_image(img3)["image_emb"])
    with pytest.raises(ValueError, match="built for 64×64"):
        model.encode_image(img[:, :, :56, :56])  # no silent position-embedding interpolation


def test_pooled_is_pre_ln_mean_of_all_tokens_and_patches_post_ln(cfg, tok):
    model = make_model(cfg, tok).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        ref = model.vision.vit(pixel_values=x, output_hidden_states=True)
        pooled, patches = model.vision(x)
    assert ref.hidden_states[-1].shape[1] == 1 + 4 + 64  # CLS + registers + patches
    torch.testing.assert_close(pooled, ref.hidden_states[-1].mean(dim=1))
    torch.testing.assert_close(patches, ref.last_hidden_state[:, 5:])


def test_text_pooling_and_sentence_gather_by_hand():
    hidden = torch.tensor([[[1.0], [2.0], [3.0], [6.0]], [[4.0], [5.0], [6.0], [9.0]]])  # B×L×C
    mask = torch.tensor([[1, 1, 0, 0], [1, 1, 1, 1]])
    assert pool_text(hidden, mask, "mean").flatten().tolist() == [3.0, 6.0]  # pads count too
    assert pool_text(hidden, mask, "first_pad").flatten().tolist() == [3.0, 4.0]  # no pad → index 0
    sent, smask = gather_sentences(hidden, torch.tensor([[0, 1, 0, 1], [0, 0, 1, 0]], dtype=torch.bool))
    assert sent[0].flatten().tolist() == [2.0, 6.0] and sent[1, 0].item() == 6.0
    assert smask.tolist() == [[True, True], [True, False]]


def test_gradients_reach_only_trainable_parameters(cfg, tok):
    model = make_model(cfg, tok).train()
    img, img2, enc = batch(tok)
    out1 = model(img, enc["input_ids"], enc["attention_mask"], enc["sep_mask"])
    out2 = model.encode_image(img2, local=False)
    MamaObjective(cfg.loss)(out1, out2, step=0, gather=False)["loss"].backward()
    params = dict(model.named_parameters())
    frozen = {n for n, p in params.items() if not p.requires_grad}
    # frozen: the whole text trunk but LoRA, the ViT's final-LN affine and mask token
    assert {n for n in params if n.startswith("text.") and "lora_" not in n} <= frozen
    assert {"vision.vit.layernorm.weight", "vision.vit.layernorm.bias",
            "vision.vit.embeddings.mask_token"} <= frozen
    assert frozen == {n for n in params if (n.startswith("text.") and "lora_" not in n)
                      or n.startswith(("vision.vit.layernorm.", "vision.vit.embeddings.mask_token"))}
    assert all(params[n].grad is None for n in frozen)
    # every trainable parameter gets a gradient; LoRA A is zero at init because B starts at 0
    zero_ok = {n for n in params if "lora_A" in n}
    for n, p in params.items():
        if n not in frozen:
            assert p.grad is not None, n
            assert n in zero_ok or p.grad.abs().sum().item() > 0, n
    assert any("lora_B" in n for n in params)
    assert model.trainable_parameters() == [p for n, p in params.items() if n not in frozen]


def test_train_trunk_makes_the_whole_text_trunk_trainable(cfg, tok):
    frozen_model = make_model(cfg, tok)
    model = make_model(cfg, tok, **{"model.text.train_trunk": True}).train()
    img, _, enc = batch(tok)
    out = model(img, enc["input_ids"], enc["attention_mask"], enc["sep_mask"], local=False)
    torch.nn.functional.mse_loss(out["text_emb"], torch.zeros_like(out["text_emb"]) + 0.1).backward()
    params = dict(model.named_parameters())
    text = {n for n in params if n.startswith("text.")}
    assert all(params[n].requires_grad for n in text)  # embeddings, blocks, final LN and LoRA
    wte = next(n for n in text if n.endswith("wte.weight"))
    used = enc["input_ids"].unique()
    assert params[wte].grad[used].abs().sum(dim=1).gt(0).all()  # every token of the texts moves
    # the vision side keeps the method's frozen parts; the frozen-trunk model trains fewer weights
    assert not params["vision.vit.layernorm.weight"].requires_grad
    n_trainable = sum(p.numel() for p in model.trainable_parameters())
    n_frozen_run = sum(p.numel() for p in frozen_model.trainable_parameters())
    trunk = sum(p.numel() for n, p in params.items() if n.startswith("text.") and "lora_" not in n)
    assert n_trainable == n_frozen_run + trunk


def test_local_parameters_are_local_heads_and_scale(cfg, tok):
    model = make_model(cfg, tok)
    names = {id(p): n for n, p in model.named_parameters()}
    got = {names[id(p)] for p in model.local_parameters()}
    assert got == {n for n in names.values() if n.startswith(("local_image_head.", "local_text_head."))} | {
        "local_scale"}
    assert all(p.requires_grad for p in model.local_parameters())  # the trainer decides when to freeze


def test_activation_checkpointing_gives_the_same_gradients(cfg, tok):
    img, _, enc = batch(tok)
    grads = []
    for ckpt in (False, True):
        model = make_model(cfg, tok, **{"model.vision.grad_ckpt": ckpt, "model.text.grad_ckpt": ckpt,
                                        "model.lora.dropout": 0.0}).eval()  # eval: no dropout
        out = model(img, enc["input_ids"], enc["attention_mask"], enc["sep_mask"])
        (out["image_emb"] * out["text_emb"]).sum().backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None})
    assert grads[0].keys() == grads[1].keys() and any("lora_B" in n for n in grads[0])
    for n in grads[0]:
        torch.testing.assert_close(grads[0][n], grads[1][n], atol=1e-6, rtol=1e-5)


def test_sentence_batchnorm_is_per_caption_batchnorm(cfg, tok):
    """Captions with ≥ 2 sentences: exactly BatchNorm1d on that caption alone (the original's
    loop), running stats included; a one-sentence caption uses the running statistics."""
    head = make_model(cfg, tok).local_text_head.train()
    bn = head.bn1
    x = torch.randn(3, 4, bn.num_features, generator=torch.Generator().manual_seed(3))
    mask = torch.tensor([[1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 1, 1]], dtype=torch.bool)
    with torch.no_grad():
        bn.weight.uniform_(0.5, 1.5)
        bn.bias.uniform_(-0.5, 0.5)
    ref = torch.nn.BatchNorm1d(bn.num_features)
    ref.load_state_dict(bn.state_dict())
    start_mean, start_var = bn.running_mean.clone(), bn.running_var.clone()
    y = bn(x, mask)
    torch.testing.assert_close(y[0, :3], ref(x[0, :3]))  # ref updates its running stats in order
    torch.testing.assert_close(y[2], ref(x[2]))
    torch.testing.assert_close(bn.running_mean, ref.running_mean)
    torch.testing.assert_close(bn.running_var, ref.running_var)
    single = (x[1, 0] - start_mean) / torch.sqrt(start_var + bn.eps) * bn.weight + bn.bias
    torch.testing.assert_close(y[1, 0], single)
    assert y[0, 3].abs().max().item() == 0 and y[1, 1:].abs().max().item() == 0


def test_save_load_round_trip_local_and_s3(cfg, tok, tmp_path, s3_bucket):
    model = make_model(cfg, tok)
    img, _, enc = batch(tok)
    with torch.no_grad():
        model(img, enc["input_ids"], enc["attention_mask"], enc["sep_mask"])  # move BN running stats
        model.logit_scale.fill_(1.5)
    model.eval()
    with torch.no_grad():
        want = model(img, enc["input_ids"], enc["attention_mask"], enc["sep_mask"])
    _, bucket = s3_bucket
    for uri in (str(tmp_path / "saved"), f"s3://{bucket}/runs/x/model"):
        model.save_pretrained(uri)
        loaded = MamaModel.from_pretrained(uri).eval()
        assert len(loaded.tokenizer) == len(tok)
        with torch.no_grad():
            got = loaded(img, enc["input_ids"], enc["attention_mask"], enc["sep_mask"])
        for k in want:
            assert torch.equal(want[k], got[k]), (uri, k)
    with pytest.raises(ValueError, match="not a saved MamaModel"):
        MamaModel.from_pretrained(str(tmp_path / "nothing"))


def test_tower_weights_load_from_folder_and_s3(cfg, tok, tmp_path, s3_bucket):
    from mama_ray import storage

    src = make_model(cfg, tok, seed=5)
    src.vision.vit.save_pretrained(tmp_path / "vit")
    src.text.lm.get_base_model().save_pretrained(tmp_path / "gpt2")
    _, bucket = s3_bucket
    storage.upload_dir(tmp_path / "gpt2", f"s3://{bucket}/models/gpt2")
    model = make_model(cfg, tok, seed=6, **{"model.vision.weights": str(tmp_path / "vit"),
                                            "model.text.weights": f"s3://{bucket}/models/gpt2",
                                            "storage.cache_dir": str(tmp_path / "cache")})
    for name in ("embeddings.position_embeddings", "encoder.layer.1.mlp.fc2.weight"):
        assert torch.equal(model.vision.vit.get_parameter(name), src.vision.vit.get_parameter(name))
    emb = "base_model.model.wte.weight"
    assert torch.equal(model.text.lm.get_parameter(emb), src.text.lm.get_parameter(emb))
    # a checkpoint whose vocabulary lacks the added tokens grows to the tokenizer's length
    from transformers import GPT2Config, GPT2Model
    small = GPT2Model(GPT2Config(vocab_size=100, n_positions=256, n_embd=32, n_layer=2, n_head=2,
                                 bos_token_id=None, eos_token_id=None))
    small.save_pretrained(tmp_path / "small")
    grown = make_model(cfg, tok, **{"model.text.weights": str(tmp_path / "small")})
    wte = grown.text.lm.get_parameter(emb)
    assert wte.shape == (len(tok), 32) and torch.equal(wte[:100], small.wte.weight)
    with pytest.raises(ValueError, match="hidden_size"):
        make_model(cfg, tok, **{"model.vision.weights": str(tmp_path / "vit"), "model.vision.hidden_size": 64,
                                "model.vision.num_heads": 2})


def test_bert_text_tower(cfg, tok):
    with pytest.raises(ValueError, match="query, key, value"):
        make_model(cfg, tok, **{"model.text.arch": "bert"})
    model = make_model(cfg, tok, **{"model.text.arch": "bert", "model.lora.targets": ["query", "value"]})
    img, _, enc = batch(tok)
    out = model(img, enc["input_ids"], enc["attention_mask"], enc["sep_mask"])
    assert out["text_emb"].shape == (3, 32) and out["sent_mask"].sum().item() == 13
    trainable = [n for n, p in model.named_parameters() if p.requires_grad and n.startswith("text.")]
    assert trainable and all("lora_" in n and (".query." in n or ".value." in n) for n in trainable)
    assert F.cosine_similarity(out["text_emb"][0], out["text_emb"][1], dim=0).item() < 1.0
