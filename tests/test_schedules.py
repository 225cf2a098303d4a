import argparse
import math

import pytest
import torch

import models_mim
from util import lr_sched
from util.freezeout import param_groups


def test_cosine_schedule_against_formula():
    f = lr_sched.cosine_schedule
    assert f(0, 100, 10, 1.0) == 0
    assert f(5, 100, 10, 1.0) == pytest.approx(0.5)
    assert f(10, 100, 10, 1.0, 0.1) == pytest.approx(1.0)
    assert f(55, 100, 10, 1.0, 0.1) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * 0.5)))
    assert f(100, 100, 10, 1.0, 0.1) == pytest.approx(0.1)


def decay_of(groups, model):
    names = {id(p): n for n, p in model.named_parameters()}
    return {names[id(p)]: g['weight_decay'] for g in groups for p in g['params']}


@pytest.mark.parametrize('per_unit', [False, True])
def test_weight_decay_as_timms_add_weight_decay(per_unit):
    """Decay on every parameter of more than one dimension not named *.bias, tokens included (the originals)."""
    model = models_mim.MIM_vit_tiny_patch4()
    decay = decay_of(param_groups(model, 0.05, per_unit=per_unit), model)
    assert len(decay) == len(list(model.parameters()))
    for name in ('cls_token', 'decoders.0.mask_token', 'patch_embed.proj.weight', 'blocks.0.attn.qkv.weight',
                 'blocks.5.mlp.fc2.weight', 'decoders.3.pred.weight', 'decoders.0.head.0.weight'):
        assert decay[name] == 0.05, name
    for name in ('patch_embed.proj.bias', 'blocks.0.norm1.weight', 'blocks.0.norm1.bias', 'blocks.0.attn.qkv.bias',
                 'tap_norms.0.weight', 'decoders.0.head.1.weight', 'decoders.0.head.1.bias', 'decoders.2.norm.weight'):
        assert decay[name] == 0., name
    mae = models_mim.mae_vit_tiny_patch4()
    decay = decay_of(param_groups(mae, 0.05, per_unit=per_unit), mae)
    assert decay['mask_token'] == decay['cls_token'] == decay['decoder_pred.weight'] == 0.05
    assert decay['decoder_norm.weight'] == decay['norm.bias'] == 0.


def test_param_groups_per_unit():
    model = models_mim.MIM_vit_tiny_patch4()
    groups = param_groups(model, 0.05, per_unit=True)
    names = {g['name'] for g in groups}
    assert names == {f'unit{u}' for u in range(model.num_units)} | {f'tap{k}' for k in range(4)}
    unit0 = [p for g in groups if g['unit'] == 0 for p in g['params']]
    assert any(p is model.cls_token for p in unit0) and any(p is model.patch_embed.proj.weight for p in unit0)
    tap2 = [p for g in groups if g['tap'] == 2 for p in g['params']]
    assert any(p is model.decoders[2].pred.weight for p in tap2) and any(p is model.tap_norms[2].bias for p in tap2)
    # the cls token is no unit under utkutpcgl/freezeout_localmim_rho's rules: a group of its own
    original = models_mim.MIM_vit_tiny_patch4(cls_token_in_unit0=False)
    groups = param_groups(original, 0.05, per_unit=True)
    assert [g['params'] for g in groups if g['name'] == 'cls_token'] == [[original.cls_token]]


def test_lr_follows_blr_scaling_and_group_scale():
    from util.misc import scale_lr
    args = argparse.Namespace(total_steps=100, warmup_steps=10, steps_per_epoch=10, lr=None, blr=1e-4, min_lr=0.,
                              batch_size=64, accum_iter=8, world_size=1)
    scale_lr(args)  # lr = blr x effective batch (64 x 8 x 1 process) / 256
    assert args.lr == pytest.approx(2e-4)
    args.lr, args.blr, args.accum_iter = None, 1.5e-4, 2
    scale_lr(args)
    assert args.lr == pytest.approx(7.5e-5)
    scale_lr(args)  # an lr already set (--lr) is kept
    assert args.lr == pytest.approx(7.5e-5)
    args.lr = 1e-3  # the schedule below peaks at 1e-3
    opt = torch.optim.SGD([{'params': [torch.zeros(1, requires_grad=True)], 'lr_scale': 0.5},
                           {'params': [torch.zeros(1, requires_grad=True)]}], lr=1.)
    lr_sched.adjust_learning_rate(opt, 10, args)
    assert [g['lr'] for g in opt.param_groups] == pytest.approx([5e-4, 1e-3])
