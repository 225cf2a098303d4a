"""Both FreezeOut rule sets against their formulas at every optimizer step of a real run (steps.txt),
across the end of warm-up and every freeze, with gradient accumulation and a fractional warm-up."""
import json
import math

import pytest

from conftest import TINY_PRETRAIN, run_script

LR, MIN_LR, T, W = 1e-3, 1e-5, 10, 2  # 2 epochs x 5 steps (80 images, 8 x 2 per step), warm-up 0.4 epoch
TAPS = [1, 3, 3, 5]  # MIM_vit_tiny_patch4 (depth 6): blocks 1, 3, depth-3, depth-1
T_I = [0.5 + 0.5 * i / 6 for i in range(7)]  # linear, t_0 = 0.5, 7 units


def ordinary(s):
    if s < W:
        return LR * s / W
    return MIN_LR + (LR - MIN_LR) / 2 * (1 + math.cos(math.pi * (s - W) / (T - W)))


def original_unit(i, s):
    """utkutpcgl/freezeout_localmim_rho: warm-up to lr, then lr/t_i down a cosine over (T-W) t_i steps to 0."""
    t = T_I[i]
    if t < 1 and s >= W + math.floor((T - W) * t) + 1:
        return None  # frozen
    if s < W:
        return LR * s / W
    return LR / t / 2 * (1 + math.cos(math.pi * (s - W) / ((T - W) * t)))


def project_unit(i, s):
    """This project: warm-up to lr/t_i, cosine to 0 at t_i T; the last unit keeps the ordinary schedule."""
    t = T_I[i]
    if t == 1:
        return ordinary(s)
    if s >= t * T:
        return None
    if s < W:
        return LR / t * s / W
    return LR / t / 2 * (1 + math.cos(math.pi * (s - W) / (t * T - W)))


def expected(rules, s):
    unit = original_unit if rules == 'original' else project_unit
    lrs = {f'unit{i}': unit(i, s) for i in range(7)}
    if rules == 'original':
        lrs.update({f'tap{k}': unit(b + 1, s) for k, b in enumerate(TAPS)}, cls_token=ordinary(s))
    else:
        lrs.update({f'tap{k}': ordinary(s) for k in range(4)})
    frozen = sum(1 for i in range(7) if lrs[f'unit{i}'] is None)
    return {k: 0. if v is None else v for k, v in lrs.items()}, frozen


@pytest.mark.slow
@pytest.mark.parametrize('rules', ['original', 'project'])
def test_every_step_follows_the_rules(tmp_path, small_data, rules):
    run_script('run_pretrain.py', *TINY_PRETRAIN, '--data_path', small_data, '--output_dir', tmp_path,
               '--batch_size', '8', '--accum_iter', '2', '--epochs', '2', '--warmup_epochs', '0.4', '--lr', str(LR),
               '--min_lr', str(MIN_LR), '--freezeout', '--how_scale', 'linear', '--t_0', '0.5',
               '--freezeout_rules', rules, '--log_every_step')
    records = [json.loads(line) for line in (tmp_path / 'steps.txt').read_text().splitlines()]
    assert [r['step'] for r in records] == list(range(T))
    assert [r['iter'] for r in records] == list(range(1, 2 * T, 2))  # the update iteration of each step
    for r in records:
        lrs, frozen = expected(rules, r['step'])
        assert r['frozen_units'] == frozen, r
        for name, lr in lrs.items():
            assert r['lrs'][name] == pytest.approx(lr, rel=1e-9, abs=1e-15), (r['step'], name)
    # the freezes that happen in these 10 steps: original at steps 7, 8, 9; project at 5, 6, 7, 8, 9
    first_frozen = {r['frozen_units']: r['step'] for r in reversed(records)}
    if rules == 'original':
        assert first_frozen == {0: 0, 2: 7, 3: 8, 5: 9}
        assert 'cls_token' in records[-1]['lrs'] and records[-1]['lrs']['cls_token'] > 0
    else:
        assert first_frozen == {0: 0, 1: 5, 2: 6, 3: 7, 4: 8, 5: 9}


@pytest.mark.parametrize('option', ['no_scale_lr', 'dont_freeze_pe', 'global'])
def test_original_rules_options_against_formulas(option):
    from util.freezeout import FreezeOut
    fo = FreezeOut(num_units=7, tap_units=[2, 4, 4, 6], total_steps=T, warmup_steps=W, lr=LR, min_lr=MIN_LR, t_0=0.5,
                   how_scale='linear', rules='original', scale_lr=option != 'no_scale_lr',
                   freeze_pe=option != 'dont_freeze_pe', lr_mode='global' if option == 'global' else 'layerwise')
    # --dont_freeze_pe: the patch embedding is no unit; the blocks are the units, t over 6 of them
    t = [None] + [0.5 + 0.5 * i / 5 for i in range(6)] if option == 'dont_freeze_pe' else T_I
    for s in range(T):
        for i in range(7):
            frozen = t[i] is not None and t[i] < 1 and s >= W + math.floor((T - W) * t[i]) + 1
            if frozen:
                want = 0.
            elif t[i] is None or option == 'global':
                want = ordinary(s)
            elif s < W:
                want = LR * s / W
            else:
                peak = LR if option == 'no_scale_lr' else LR / t[i]
                want = peak / 2 * (1 + math.cos(math.pi * (s - W) / ((T - W) * t[i])))
            assert fo.unit_lr(i, s) == pytest.approx(want, rel=1e-12, abs=1e-18), (option, s, i)
            assert (i in fo.frozen_set(s)) == frozen


def test_original_rules_keep_the_cls_token_training_through_frozen_blocks():
    import torch
    import models_mim
    model = models_mim.MIM_vit_tiny_patch4(cls_token_in_unit0=False, freeze_decoders=True)
    model.set_frozen({0, 1, 2})  # patch embedding, blocks 0 and 1
    assert model.no_grad_units == 1 and model.cls_token.requires_grad
    loss, parts = model(torch.randn(2, 3, 32, 32))
    assert 'loss_blk1_x4' not in parts  # the tap reading block 1 is dropped with its unit
    loss.backward()
    assert model.cls_token.grad is not None and model.blocks[0].attn.qkv.weight.grad is None
    assert model.patch_embed.proj.weight.grad is None and model.blocks[2].attn.qkv.weight.grad is not None
