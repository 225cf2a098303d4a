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


def test_param_groups_no_decay_on_1d_and_tokens():
    model = models_mim.MIM_vit_tiny_patch4()
    groups = param_groups(model, 0.05, per_unit=False)
    names = {id(p): n for n, p in model.named_parameters()}
    for g in groups:
        for p in g['params']:
            n = names[id(p)]
            expect_no_decay = p.ndim <= 1 or n.endswith('token')
            assert g['weight_decay'] == (0. if expect_no_decay else 0.05), n
    assert sum(len(g['params']) for g in groups) == len(names)


def test_param_groups_per_unit():
    model = models_mim.MIM_vit_tiny_patch4()
    groups = param_groups(model, 0.05, per_unit=True)
    units = {g['unit'] for g in groups}
    assert units == {None, *range(model.num_units)}
    unit0 = [p for g in groups if g['unit'] == 0 for p in g['params']]
    assert any(p is model.cls_token for p in unit0) and any(p is model.patch_embed.proj.weight for p in unit0)


def test_lr_follows_blr_scaling_and_group_scale():
    args = argparse.Namespace(total_steps=100, warmup_steps=10, lr=1e-3, min_lr=0.)
    opt = torch.optim.SGD([{'params': [torch.zeros(1, requires_grad=True)], 'lr_scale': 0.5},
                           {'params': [torch.zeros(1, requires_grad=True)]}], lr=1.)
    lr_sched.adjust_learning_rate(opt, 10, args)
    assert [g['lr'] for g in opt.param_groups] == pytest.approx([5e-4, 1e-3])
