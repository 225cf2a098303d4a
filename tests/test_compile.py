"""torch.compile sees one whole graph: a training step's forward, loss and backward compile with fullgraph=True
(any graph break would raise), so nothing falls back to eager on the GPU; and it computes what eager computes."""
import pytest
import torch

import models_mim
from conftest import small_mae

CASES = {
    'LocalMIM': ('MIM_vit_tiny_patch4', {}, ()),
    'LocalMIM, FreezeOut original rules, taps dropped': ('MIM_vit_tiny_patch4', dict(cls_token_in_unit0=False,
                                                                                     freeze_decoders=True), range(3)),
    'LocalMIM, FreezeOut project rules': ('MIM_vit_tiny_patch4', {}, range(3)),
    'LocalMIM, --all_stages': ('MIM_vit_tiny_patch4', dict(all_stages=True), ()),
    'LocalMIM, --pos_embed rope': ('MIM_vit_tiny_patch4', dict(pos_embed='rope'), ()),
    'LocalMIM, --grad_ckpt': ('MIM_vit_tiny_patch4', dict(grad_ckpt=True), range(2)),
    'LocalMIM, --hog_bias': ('MIM_vit_tiny_patch4', dict(hog_bias=True), ()),
    'MAE, --norm_pix_loss': ('mae_vit_tiny_patch4', dict(norm_pix_loss=True), ()),
    'LocalMIM on Swin': ('MIM_swin_tiny_patch2_win4', {}, ()),
    # half masked: the first stage attends through padded windows
    'LocalMIM on Swin, mask ratio 0.5, --grad_ckpt, --target pixel': (
        'MIM_swin_tiny_patch2_win4', dict(grad_ckpt=True, target='pixel', norm_pix_loss=True), (), 0.5),
}


@pytest.mark.slow
@pytest.mark.parametrize('case', list(CASES))
def test_training_step_compiles_without_graph_breaks(case):
    name, kwargs, frozen, ratio = (*CASES[case], 0.75)[:4]
    torch.manual_seed(0)
    model = models_mim.all_models()[name](img_size=32, **kwargs)
    if frozen:
        model.set_frozen(frozen)
    images, noise = torch.randn(2, 3, 32, 32), torch.rand(2, model.num_mask_units)
    eager_loss, _ = model(images, ratio, noise)
    eager_loss.backward()
    eager_grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)

    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend='aot_eager')  # AOT autograd traces the backward too
    loss, losses = compiled(images, ratio, noise)
    loss.backward()
    torch.testing.assert_close(loss, eager_loss)
    grads = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert grads.keys() == eager_grads.keys()
    for n in grads:
        torch.testing.assert_close(grads[n], eager_grads[n], msg=n)


def count_graphs(monkeypatch):
    """Every graph torch.compile makes from now on (model or module compile, any mode), run as traced."""
    graphs = []

    def counting_backend(gm, example_inputs):
        graphs.append(gm)
        return gm.forward

    real_compile = torch.compile
    monkeypatch.setattr(torch, 'compile', lambda fn, mode=None, dynamic=None: real_compile(
        fn, backend=counting_backend, dynamic=dynamic))
    return graphs


@pytest.mark.slow
def test_compiled_loss_of_a_single_tap_keeps_its_gradient():
    """The state of a FreezeOut run under the original rules once only the last tap trains: one loss term of weight
    1. Compiled as one graph by inductor, its sum and the log's detached copy of the term came back as one tensor,
    and backward failed ('element 0 of tensors does not require grad'). The compiled gradients equal the eager ones."""
    torch.manual_seed(0)
    model = models_mim.LocalMIM(img_size=16, patch_size=4, embed_dim=16, depth=4, num_heads=1, decoder_dim=8,
                                decoder_heads=1, taps=[3], scales=[1])
    images, noise = torch.randn(2, 3, 16, 16), torch.rand(2, model.num_mask_units)
    grads = []
    for step in (model, torch.compile(model)):
        model.zero_grad()
        loss, _ = step(images, 0.75, noise)
        assert loss.requires_grad
        loss.backward()
        grads.append([p.grad for p in model.parameters() if p.requires_grad])
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-4, atol=1e-6)
    torch._dynamo.reset()


def test_every_freezeout_event_recompiles_past_dynamos_recompile_limit(monkeypatch):
    """Without dropping the old graphs, torch._dynamo stops compiling after `recompile_limit` of them and the
    model runs eager for the rest of the run: a ViT-B FreezeOut run has up to 12 events, the default limit is 8."""
    import argparse
    from util import distributed
    graphs = count_graphs(monkeypatch)
    torch.manual_seed(0)
    model = small_mae(depth=2)
    images, noise = torch.randn(2, 3, 16, 16), torch.rand(2, model.num_mask_units)
    args = argparse.Namespace(compile='default', compile_scope='model', freezeout=True, distributed=False)
    states = range(3)  # 0, 1, 2 units frozen: two events past the limit
    with torch._dynamo.config.patch(recompile_limit=1):
        for frozen in states:
            model.set_frozen(range(frozen))
            loss, _ = distributed.wrap_for_training(model, args)(images, 0.75, noise)
            loss.backward()
    assert len(graphs) == len(states)
    torch._dynamo.reset()


@pytest.mark.parametrize('rules', ['project', 'original'])
def test_compiled_blocks_need_no_new_graph_after_the_second_freezeout_event(monkeypatch, rules):
    """--compile_scope blocks (the default with --freezeout): the encoder's blocks share their graphs, so a FreezeOut
    event compiles at most a frozen variant of a block (no grad, or weights without grad), once; later events
    compile nothing, and all of a run's graphs stay within torch._dynamo's recompile limit. Counted with a backend
    that runs each graph as traced."""
    import argparse
    from util import distributed
    graphs = count_graphs(monkeypatch)
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = models_mim.MIM_vit_tiny_patch4(cls_token_in_unit0=rules == 'project', freeze_decoders=rules == 'original')
    images, noise = torch.randn(2, 3, 32, 32), torch.rand(2, model.num_mask_units)
    args = argparse.Namespace(compile='default', compile_scope=None, freezeout=True, distributed=False)
    counts = []
    for frozen in range(model.num_units):
        model.set_frozen(range(frozen))
        step = distributed.wrap_for_training(model, args)
        assert step is model  # compiled in place, parameter names unchanged
        loss, _ = step(images, 0.75, noise)
        loss.backward()
        counts.append(len(graphs))
    # one graph per block variant, one per decoder head (4), one for the HOG target
    assert counts[0] == 6 and counts[2:] == [counts[2]] * (model.num_units - 2) and counts[-1] <= 8, counts
    torch._dynamo.reset()


def test_compile_scope_defaults_and_refusals():
    import argparse
    from util import distributed
    from util.errors import UsageError

    def scope(compile, freezeout, chosen=None):
        return distributed.compile_scope(argparse.Namespace(compile=compile, compile_scope=chosen), freezeout)
    assert scope('default', True) == 'blocks' and scope('default', False) == 'model'
    assert scope('reduce-overhead', True) == 'model' and scope('default', True, 'model') == 'model'
    swin = models_mim.all_models()['MIM_swin_tiny_patch2_win4']()
    with pytest.raises(UsageError, match='compiles as one model'):
        distributed.compile_model(swin, 'default', 'blocks')
    with pytest.raises(UsageError, match='captures the whole step as CUDA graphs'):
        distributed.compile_model(small_mae(depth=1), 'reduce-overhead', 'blocks')


class OverwritesItsLastOutputs(torch.nn.Module):
    """What a CUDA graph replay does to the tensors the previous replay returned: their memory holds the new
    step's outputs (here: NaN), so anything the training loop keeps of them across steps changes."""

    def __init__(self, model):
        super().__init__()
        self.model, self.last = model, []

    def forward(self, *args):
        for t in self.last:
            t.data.fill_(float('nan'))
        loss, losses = self.model(*args)
        self.last = [loss, *losses.values()]
        return loss, losses


class ScalarRecorder:
    def __init__(self):
        self.scalars = []

    def add_scalar(self, name, value, step):
        self.scalars.append((name, value, step))


def test_the_training_loop_keeps_no_step_output_that_cuda_graphs_overwrite(tmp_path):
    """--compile reduce-overhead (CUDA graphs) reuses the outputs' memory on the next step: the loop's log (the
    buffered TensorBoard scalars, the running medians and averages) must hold copies, so it reads the same either
    way. Simulated on CPU by a model that overwrites the tensors it returned before."""
    from engine_pretrain import train_one_epoch
    from run_pretrain import get_args_parser
    from util.freezeout import param_groups
    import util.misc as misc
    args = get_args_parser().parse_args(['--amp', 'none', '--epochs', '1', '--warmup_epochs', '0', '--lr', '1e-3',
                                         '--output_dir', str(tmp_path), '--print_freq', '100'])
    args.distributed, args.steps_per_epoch, args.total_steps, args.warmup_steps = False, 4, 4, 0
    g = torch.Generator().manual_seed(1)
    batches = [(torch.randn(4, 3, 32, 32, generator=g), torch.rand(4, 64, generator=g), 0) for _ in range(4)]

    def train(wrap):
        """The epoch's averages and the logged scalars but the per-group lrs."""
        torch.manual_seed(0)
        model = models_mim.MIM_vit_tiny_patch4()
        opt = torch.optim.AdamW(param_groups(model, 0.05, per_unit=False), lr=1e-3)
        writer = ScalarRecorder()
        stats, _ = train_one_epoch(wrap(model), model, batches, opt, misc.LossScaler('cpu', enabled=False),
                                   torch.device('cpu'), 0, args, log_writer=writer)
        return stats, [(name, float(value), step) for name, value, step in writer.scalars
                       if not name.startswith('lr/')]
    stats, logged = train(OverwritesItsLastOutputs)
    taps = len(models_mim.MIM_vit_tiny_patch4().taps)
    assert len(logged) == 4 * (2 + taps) and all(v == v for _, v, _ in logged)  # loss, lr, taps; no NaN
    stats_ref, logged_ref = train(lambda model: model)
    assert logged == logged_ref
    assert stats == stats_ref
