"""torch.compile sees one whole graph: a training step's forward, loss and backward compile with fullgraph=True
(any graph break would raise), so nothing falls back to eager on the GPU; and it computes what eager computes."""
import pytest
import torch

import models_mim

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
