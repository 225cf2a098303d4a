import math

import pytest
import torch

import models_mim
from util.freezeout import FreezeOut, param_groups
from util.lr_sched import adjust_learning_rate


def schedule(n=7, T=1000, W=100, t_0=0.5, how='linear', scale_lr=True):
    return FreezeOut(num_units=n, total_steps=T, warmup_steps=W, lr=1e-3, min_lr=1e-5, t_0=t_0, how_scale=how,
                     scale_lr=scale_lr, rules='project')


@pytest.mark.parametrize('how,power', [('linear', 1), ('squared', 2), ('cubic', 3)])
def test_t_and_end_steps_by_hand(how, power):
    fo = schedule(how=how, t_0=0.8)
    for i in range(7):
        t = (0.8 + 0.2 * i / 6) ** power
        assert fo.t[i] == pytest.approx(t)
        assert fo.freeze_steps[i] == (math.ceil(t * 1000) if i < 6 else math.inf)
    assert fo.t[-1] == 1


def test_unit_lr_at_chosen_steps():
    fo = schedule()  # unit 1: t = 0.5 + 0.5/6, T_1 = 583.3
    t1, end1 = 0.5 + 0.5 / 6, (0.5 + 0.5 / 6) * 1000
    assert fo.unit_lr(1, 0) == 0
    assert fo.unit_lr(1, 50) == pytest.approx(1e-3 / t1 * 0.5)  # warm-up to the unit's scaled peak
    assert fo.unit_lr(1, 100) == pytest.approx(1e-3 / t1)
    mid = (100 + end1) / 2
    assert fo.unit_lr(1, mid) == pytest.approx(1e-3 / t1 * 0.5)  # half-way down its own cosine
    assert fo.unit_lr(1, 583) > 0 and fo.unit_lr(1, 584) == 0  # frozen from T_1 on
    # the last unit keeps the ordinary schedule, min_lr included
    assert fo.unit_lr(6, 1000) == pytest.approx(1e-5)
    assert fo.unit_lr(6, 550) == pytest.approx(1e-5 + (1e-3 - 1e-5) * 0.5)
    assert schedule(scale_lr=False).unit_lr(1, 100) == pytest.approx(1e-3)


def test_units_freeze_in_order_exactly_at_their_end_step():
    fo = schedule()
    for i, step in enumerate(fo.freeze_steps[:-1]):
        assert fo.num_frozen(step - 1) == i and fo.num_frozen(step) == i + 1
    assert fo.num_frozen(10 ** 6) == 6  # the last unit never freezes


def test_freeze_inside_warmup_is_an_error():
    with pytest.raises(ValueError, match='--t_0.*--warmup_epochs'):
        schedule(t_0=0.5, how='cubic', W=200)


def train_steps(model, opt, fo, steps, start=0):
    args = type('A', (), dict(total_steps=fo.total_steps, warmup_steps=fo.warmup_steps, lr=fo.lr,
                              min_lr=fo.min_lr))
    for step in range(start, start + steps):
        fo.update(model, step)
        adjust_learning_rate(opt, step, args, fo)
        loss, _ = model(torch.randn(2, 3, 32, 32))
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)


def test_frozen_units_do_not_change_while_others_do():
    torch.manual_seed(0)
    model = models_mim.MIM_vit_tiny_patch4()
    fo = FreezeOut(num_units=model.num_units, total_steps=20, warmup_steps=1, lr=1e-3, min_lr=0, t_0=0.3,
                   how_scale='linear', rules='project')
    opt = torch.optim.AdamW(param_groups(model, 0.05, per_unit=True), lr=1e-3)
    train_steps(model, opt, fo, 12)
    n = model.frozen_units
    assert 0 < n < model.num_units
    before = {k: v.clone() for k, v in model.state_dict().items()}
    train_steps(model, opt, fo, 2, start=12)
    assert model.frozen_units >= n
    after = model.state_dict()
    assert torch.equal(after['cls_token'], before['cls_token'])
    assert torch.equal(after['patch_embed.proj.weight'], before['patch_embed.proj.weight'])  # weight decay too
    for b in range(n - 1):
        assert torch.equal(after[f'blocks.{b}.mlp.fc1.weight'], before[f'blocks.{b}.mlp.fc1.weight'])
    assert not torch.equal(after['blocks.5.mlp.fc1.weight'], before['blocks.5.mlp.fc1.weight'])
    assert not torch.equal(after['decoders.0.pred.weight'], before['decoders.0.pred.weight'])
    assert all(g['lr'] == 0 for g in opt.param_groups if g['unit'] is not None and g['unit'] < n)


def test_frozen_prefix_builds_no_autograd_graph():
    model = models_mim.MIM_vit_tiny_patch4()
    model.set_frozen(range(3))  # patch embedding, blocks 0 and 1
    seen = {}
    for i, blk in enumerate(model.blocks):
        blk.register_forward_hook(lambda m, inp, out, i=i: seen.__setitem__(i, out.grad_fn is not None))
    loss, _ = model(torch.randn(2, 3, 32, 32))
    assert seen == {0: False, 1: False, 2: True, 3: True, 4: True, 5: True}
    loss.backward()
    assert model.blocks[1].attn.qkv.weight.grad is None and model.blocks[2].attn.qkv.weight.grad is not None


def test_freeze_decoders_drops_the_right_loss_terms():
    model = models_mim.MIM_vit_tiny_patch4(freeze_decoders=True)  # taps at blocks 1, 3, 3, 5
    model.set_frozen(range(3))  # blocks 0, 1 frozen: the tap on block 1 is dropped
    _, losses = model(torch.randn(2, 3, 32, 32))
    assert set(losses) == {'loss_blk3_x2', 'loss_blk3_x1', 'loss_blk5_x0.5'}
    assert not any(p.requires_grad for p in model.decoders[0].parameters())
    model.set_frozen(range(5))  # blocks 0-3 frozen
    assert set(model(torch.randn(2, 3, 32, 32))[1]) == {'loss_blk5_x0.5'}
    kept = models_mim.MIM_vit_tiny_patch4()  # default: decoders of frozen taps keep training
    kept.set_frozen(range(5))
    assert len(kept(torch.randn(2, 3, 32, 32))[1]) == 4


def test_resumed_state_equals_uninterrupted_state():
    """Freezing and lr are functions of the step: a fresh model brought to step s matches one that ran."""
    fo = FreezeOut(num_units=7, total_steps=40, warmup_steps=2, lr=1e-3, min_lr=0, t_0=0.5, how_scale='linear',
                   rules='project')
    ran, fresh = models_mim.MIM_vit_tiny_patch4(), models_mim.MIM_vit_tiny_patch4()
    for s in range(40):
        fo.update(ran, s)
        fresh_fo = FreezeOut(num_units=7, total_steps=40, warmup_steps=2, lr=1e-3, min_lr=0, t_0=0.5,
                             how_scale='linear', rules='project')
        fresh = models_mim.MIM_vit_tiny_patch4()
        fresh_fo.update(fresh, s)
        assert fresh.frozen_units == ran.frozen_units
        assert [p.requires_grad for p in fresh.parameters()] == [p.requires_grad for p in ran.parameters()]
        assert [fresh_fo.unit_lr(u, s) for u in range(7)] == [fo.unit_lr(u, s) for u in range(7)]
