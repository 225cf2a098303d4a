"""--pos_embed rope: axial 2-D rotary position embeddings in the encoder and decoders, carried through
fine-tuning, probing, kNN and load_encoder (the timm export: tests/test_finetune.py)."""
import pytest
import torch
import torch.nn.functional as F

import models_mim
import models_vit
from conftest import TINY_PRETRAIN, run_script


def first_block_logits(model, imgs, mask_ratio, noise, monkeypatch):
    """The attention logits q k^T of the encoder's first block (B, heads, 1+L_keep, 1+L_keep), as its fused
    attention call receives them (after the rotation)."""
    seen = []
    sdpa = F.scaled_dot_product_attention

    def spy(q, k, v, **kw):
        seen.append(q @ k.transpose(-2, -1))
        return sdpa(q, k, v, **kw)
    monkeypatch.setattr(F, 'scaled_dot_product_attention', spy)
    with torch.no_grad():
        model.forward_encoder(imgs, mask_ratio, {0}, noise)
    monkeypatch.undo()
    return seen[0]


@pytest.mark.parametrize('name', ['MIM_vit_tiny_patch4', 'mae_vit_tiny_patch4'])
def test_rope_model_trains_without_a_position_table(name):
    model = models_mim.MODELS[name](pos_embed='rope')
    assert not any('pos_embed' in k or 'rope' in k for k in model.state_dict())  # rotary tables are rebuilt
    loss, _ = model(torch.rand(2, 3, 32, 32))
    loss.backward()
    assert model.blocks[0].attn.qkv.weight.grad.abs().sum() > 0


def test_rope_attention_logits_depend_only_on_relative_position(monkeypatch):
    """The same content at every patch (a flat image): the logit between two patch tokens is a function of
    their offset (dy, dx) alone, and differs between offsets (the position is seen)."""
    torch.manual_seed(0)
    model = models_mim.MIM_vit_tiny_patch4(pos_embed='rope').eval()
    g = model.grid_size
    logits = first_block_logits(model, torch.full((1, 3, 32, 32), 0.3), 0., torch.arange(float(g * g)).view(1, -1),
                                monkeypatch)[0, :, 1:, 1:]  # patch tokens, row-major
    rows, cols = torch.arange(g * g) // g, torch.arange(g * g) % g
    by_offset = {}
    for i in range(g * g):
        for j in range(g * g):
            by_offset.setdefault((int(rows[j] - rows[i]), int(cols[j] - cols[i])), []).append(logits[:, i, j])
    for values in by_offset.values():
        torch.testing.assert_close(torch.stack(values), values[0].expand(len(values), -1), rtol=0, atol=1e-4)
    per_offset = torch.stack([v[0] for v in by_offset.values()])
    assert per_offset.std(0).min() > 1e-2


def test_rope_masked_tokens_keep_their_grid_positions(monkeypatch):
    """With 75% masking each kept token is rotated by its own position: the logits among kept tokens equal those
    of the same tokens in the unmasked forward."""
    torch.manual_seed(0)
    model = models_mim.MIM_vit_tiny_patch4(pos_embed='rope').eval()
    imgs, noise = torch.rand(2, 3, 32, 32), torch.rand(2, 64)
    full = first_block_logits(model, imgs, 0., torch.arange(64.).expand(2, -1), monkeypatch)
    masked = first_block_logits(model, imgs, 0.75, noise, monkeypatch)
    keep = 1 + noise.argsort(1)[:, :16]  # token index of each kept token, in the masked sequence's order
    for b in range(2):
        torch.testing.assert_close(masked[b, :, 1:, 1:], full[b][:, keep[b]][:, :, keep[b]], rtol=0, atol=1e-5)


def test_rope_encoder_is_the_classifier_at_any_input_size():
    """The pre-training encoder and the classifier (timm's Eva) compute the same features; at another input size the
    classifier loads the same weights with nothing to interpolate."""
    model = models_mim.MIM_vit_tiny_patch4(pos_embed='rope').eval()
    state = models_vit.encoder_state_dict(model.state_dict())
    assert models_vit.encoder_kwargs(state) == {'pos_embed': 'rope'}
    x = torch.rand(2, 3, 32, 32)
    for size in (32, 64):
        clf = models_vit.vit_tiny_patch4(img_size=size, num_classes=0, global_pool=True, pos_embed='rope').eval()
        own = clf.state_dict()
        assert set(state) - {'norm.weight', 'norm.bias'} == set(own) - {'fc_norm.weight', 'fc_norm.bias'}
        assert all(state[k].shape == own[k].shape for k in own if k in state)
    clf = models_vit.vit_tiny_patch4(num_classes=0, global_pool=True, pos_embed='rope').eval()
    clf.load_state_dict(state, strict=False)
    with torch.no_grad():
        feats, _, _ = model.forward_encoder(x, 0., {5}, torch.arange(64.).expand(2, -1))
        torch.testing.assert_close(clf.forward_features(x), feats[5], rtol=0, atol=1e-6)


@pytest.mark.slow
def test_layer_scale_and_rope_come_from_the_checkpoint_in_every_entry_point(tmp_path, small_data):
    """A --layer_scale --pos_embed rope pre-training checkpoint: fine-tuning at another input size (no flag, nothing
    to interpolate), linear probing, kNN and load_encoder of the fine-tuned checkpoint take both from it."""
    run_script('run_pretrain.py', *TINY_PRETRAIN, '--data_path', small_data, '--epochs', '1', '--pos_embed', 'rope',
               '--layer_scale', '1e-5', '--output_dir', tmp_path / 'pre')
    ckpt = tmp_path / 'pre' / 'checkpoint-last.pth'
    common = ['--model', 'vit_tiny_patch4', '--batch_size', '16', '--num_workers', '0', '--data_path', small_data,
              '--finetune', ckpt, '--print_freq', '5']
    proc = run_script('run_finetune.py', *common, '--input_size', '64', '--epochs', '1', '--warmup_epochs', '0.5',
                      '--output_dir', tmp_path / 'ft')
    assert 'Interpolating' not in proc.stdout
    run_script('run_linprobe.py', *common, '--input_size', '32', '--epochs', '1', '--warmup_epochs', '0.5',
               '--output_dir', tmp_path / 'lp')
    run_script('run_knn.py', *common, '--input_size', '32', '--output_dir', tmp_path / 'knn')
    encoder = models_vit.load_encoder(tmp_path / 'ft' / 'checkpoint-last.pth')  # the fine-tuned one, at 64 px
    assert encoder.blocks[0].gamma_1.shape == (192,) and encoder.pos_embed is None
    assert models_vit.embed(encoder, torch.rand(2, 3, 64, 64), pool='mean').shape == (2, 192)
