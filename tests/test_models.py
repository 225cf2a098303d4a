import pytest
import timm
import torch

import models_common
import models_mim
from models_mim import LocalMIM, random_masking, unshuffle_with_mask_tokens


def tiny_mim(**kw):
    return models_mim.MIM_vit_tiny_patch4(**kw)


def test_masking_keeps_exact_count_and_differs_per_sample():
    torch.manual_seed(0)
    x = torch.randn(4, 64, 8)
    kept, mask, ids_restore, _ = random_masking(x, 0.75)
    assert kept.shape == (4, 16, 8)
    assert (mask.sum(1) == 48).all()
    assert not torch.equal(mask[0], mask[1])


def test_unshuffle_restores_order():
    torch.manual_seed(0)
    x = torch.arange(16.).view(1, 16, 1).expand(2, 16, 3).contiguous()
    kept, mask, ids_restore, _ = random_masking(x, 0.5)
    with_cls = torch.cat([torch.full((2, 1, 3), -1.), kept], 1)
    full = unshuffle_with_mask_tokens(with_cls, torch.full((1, 1, 3), -7.), ids_restore)[:, 1:]
    visible = mask == 0
    assert torch.equal(full[visible], x[visible])  # kept tokens back at their own positions
    assert (full[~visible] == -7).all()


def test_loss_only_on_masked_positions():
    """Changing the prediction of visible cells leaves each scale's loss unchanged."""
    torch.manual_seed(0)
    model = tiny_mim().eval()
    out, mask = model.forward_predictions(torch.randn(2, 3, 32, 32), 0.75)
    for k, (pred, target, weight) in out.items():
        base = models_common.masked_mse(pred, target, weight)
        poked = pred + 10 * (weight == 0).unsqueeze(-1).float()
        assert torch.allclose(models_common.masked_mse(poked, target, weight), base)
        assert not torch.allclose(models_common.masked_mse(pred + 10, target, weight), base)


def test_scale_masks():
    model = tiny_mim()  # 8x8 token grid
    mask = torch.zeros(1, 64)
    mask[0, 0] = 1  # token (0, 0) masked
    fine = model.scale_mask(mask, 4).view(32, 32)
    assert fine[:4, :4].all() and fine.sum() == 16
    coarse = model.scale_mask(mask, 0.5).view(4, 4)
    assert coarse[0, 0] == 0.25 and coarse.sum() == 0.25  # fractional: mean of its 2x2 tokens


def test_forward_returns_loss_and_per_scale_losses():
    model = tiny_mim()
    loss, losses = model(torch.randn(2, 3, 32, 32))
    assert set(losses) == {'loss_blk1_x4', 'loss_blk3_x2', 'loss_blk3_x1', 'loss_blk5_x0.5'}
    assert torch.isclose(loss.detach(), sum(losses.values()))
    loss.backward()
    assert all(p.grad is not None for p in model.parameters())


def test_prediction_grids_match_hog_targets():
    model = tiny_mim()
    out, _ = model.forward_predictions(torch.randn(1, 3, 32, 32), 0.75)
    assert [tuple(v[0].shape) for v in out.values()] == [(1, 1024, 27), (1, 256, 27), (1, 64, 27), (1, 16, 27)]
    assert all(v[0].shape == v[1].shape for v in out.values())


@pytest.mark.parametrize('depth,img', [(4, 32), (5, 48), (7, 16)])
def test_any_depth_and_even_grid(depth, img):
    model = LocalMIM(img_size=img, patch_size=4, embed_dim=64, depth=depth, num_heads=2, decoder_dim=64,
                     decoder_heads=2)
    loss, _ = model(torch.randn(2, 3, img, img))
    assert torch.isfinite(loss)


def test_odd_grid_is_a_clear_error():
    with pytest.raises(ValueError, match='even token grid'):
        LocalMIM(img_size=20, patch_size=4, embed_dim=64, depth=4, num_heads=2, decoder_dim=64, decoder_heads=2)


def test_mae_baseline_norm_pix_and_patchify_roundtrip():
    model = models_mim.mae_vit_tiny_patch4(norm_pix_loss=True)
    imgs = torch.randn(2, 3, 32, 32)
    assert torch.equal(model.unpatchify(model.patchify(imgs)), imgs)
    loss, losses = model(imgs)
    assert set(losses) == {'loss_pix'} and torch.isfinite(loss)


def test_encoder_keys_load_into_timm_vit():
    """Encoder state-dict keys and shapes equal timm's VisionTransformer, so timm loads them strictly."""
    ours = models_mim.MIM_vit_tiny_patch8().state_dict()
    vit = timm.models.vision_transformer.VisionTransformer(img_size=64, patch_size=8, embed_dim=192, depth=6,
                                                           num_heads=3, num_classes=0, global_pool='avg')
    theirs = vit.state_dict()
    encoder = {k: v for k, v in ours.items() if k in theirs}
    assert set(theirs) - set(encoder) == {'fc_norm.weight', 'fc_norm.bias'}
    assert all(encoder[k].shape == theirs[k].shape for k in encoder)


@pytest.mark.parametrize('name,size', [('MIM_vit_tiny_patch4', 32), ('MIM_vit_tiny_patch8', 64),
                                       ('mae_vit_tiny_patch4', 32), ('MIM_swin_tiny_patch2_win4', 32),
                                       ('MIM_vit_base_patch16', 224)])
def test_a_model_is_built_at_its_own_input_size_unless_one_is_named(name, size):
    from run_pretrain import get_args_parser
    parse = get_args_parser().parse_args
    with torch.device('meta'):
        assert models_mim.build(parse(['--model', name])).patch_embed.img_size == (size, size)
        assert models_mim.build(parse(['--model', name, '--input_size', '128'])).patch_embed.img_size == (128, 128)


def test_build_rejects_unknown_model_and_bad_size():
    from run_pretrain import get_args_parser
    parse = get_args_parser().parse_args
    with pytest.raises(ValueError, match='MIM_vit_tiny_patch4'):
        models_mim.build(parse(['--model', 'MIM_vit_nope']))
    with pytest.raises(ValueError, match='not a multiple of the patch size 8'):
        models_mim.build(parse(['--model', 'MIM_vit_tiny_patch8', '--input_size', '60']))
    with pytest.raises(ValueError, match='--loss_weights gives 3 weights for 4 decoders'):
        models_mim.build(parse(['--model', 'MIM_vit_tiny_patch4', '--input_size', '32', '--loss_weights', '1,2,3']))
    with pytest.raises(ValueError, match='--all_stages applies to LocalMIM'):
        models_mim.build(parse(['--model', 'mae_vit_tiny_patch4', '--input_size', '32', '--all_stages']))


@pytest.mark.parametrize('frozen', [0, 3])
def test_grad_ckpt_gives_the_same_gradients_and_keeps_fewer_activations(frozen):
    """Activation checkpointing recomputes the trainable blocks in backward: the same loss and gradients (to fp32
    rounding, 1e-6), composed with a FreezeOut prefix (which keeps no activations anyway)."""
    from bench.step_timer import SavedActivations
    imgs, noise = torch.randn(2, 3, 32, 32), torch.rand(2, 64)
    grads, saved = [], []
    for ckpt in (False, True):
        torch.manual_seed(0)
        model = models_mim.MIM_vit_tiny_patch4(grad_ckpt=ckpt)
        model.set_frozen(range(frozen))
        with SavedActivations() as acts:
            loss, _ = model(imgs, 0.75, noise)
        loss.backward()
        grads.append({n: p.grad for n, p in model.named_parameters() if p.grad is not None})
        saved.append(acts.bytes)
    assert grads[0].keys() == grads[1].keys() and len(grads[0]) > 0
    for name in grads[0]:
        torch.testing.assert_close(grads[1][name], grads[0][name], rtol=0, atol=1e-6)
    assert saved[1] < 0.7 * saved[0]
