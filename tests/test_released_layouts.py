"""Released checkpoints in the originals' layouts load wherever a checkpoint is accepted: Haoqing-Wang/LocalMIM's
(and utkutpcgl/freezeout_localmim_rho's) MaskedAutoencoderViT, facebookresearch/mae's pre-training checkpoints
with and without decoder, and its fine-tuned ones. The test checkpoints are built from the originals' module
names and shapes; nothing is downloaded."""
import argparse

import pytest
import torch

import models_mim
import models_vit
from conftest import run_script
from util.checkpoint import load_checkpoint_file
from util.errors import UsageError

PRED_INDEX = {4: {'head.0': 0, 'head.1': 1, 'head.3': 3, 'pred': 4}, 2: {'head': 0, 'pred': 1}, 1: {'pred': 0},
              0.5: {'pred': 1}}  # MAE_Decoder.pred: Sequential of the head's layers, then a 1x1 Conv2d


def to_localmim_layout(model):
    """Our LocalMIM state dict in Haoqing-Wang/LocalMIM's names: norm.<k>, decoder.<k>.{embed, mask_token,
    pos_embed, blocks.0, norm, pred.<i>} (the last pred layer a 1x1 conv), hog_enc.<k>.conv.{weight, bias}."""
    out = {}
    for k, v in model.state_dict().items():
        p = k.split('.')
        if p[0] == 'tap_norms':
            out[f'norm.{p[1]}.{p[2]}'] = v
        elif p[0] == 'decoders':
            scale, dec = model.scales[int(p[1])], f'decoder.{p[1]}'
            if p[2] == 'block':
                out['.'.join([dec, 'blocks', '0', *p[3:]])] = v
            elif p[2] in ('head', 'pred'):
                layer = '.'.join(p[2:-1])
                v = v[:, :, None, None] if p[2] == 'pred' and p[-1] == 'weight' else v
                out[f'{dec}.pred.{PRED_INDEX[scale][layer]}.{p[-1]}'] = v
            else:
                out['.'.join([dec, *p[2:]])] = v
        elif p[0] != 'hog':  # the original keeps its HOG layers as hog_enc.<k>.conv (below)
            out[k] = v
    sobel = torch.tensor([[1., 0., -1.], [2., 0., -2.], [1., 0., -1.]])
    for k in range(len(model.scales)):
        out[f'hog_enc.{k}.conv.weight'] = torch.stack([sobel, sobel.t()])[:, None]
        if model.hog.grad_bias is not None:
            out[f'hog_enc.{k}.conv.bias'] = model.hog.grad_bias[k].clone()
    return out


def localmim_checkpoint(tmp_path, hog_bias=False):
    torch.manual_seed(0)
    model = models_mim.MIM_vit_tiny_patch4(hog_bias=hog_bias)
    if hog_bias:  # as if drawn by the original run
        model.hog.grad_bias.uniform_(-1 / 3, 1 / 3)
    state = to_localmim_layout(model)
    assert {'norm.3.weight', 'decoder.0.blocks.0.attn.qkv.weight', 'decoder.0.pred.4.weight',
            'decoder.1.pred.0.weight', 'decoder.3.pred.1.bias', 'hog_enc.2.conv.weight'} <= set(state)
    args = argparse.Namespace(model='MIM_vit_tiny_patch4', input_size=32, hog_nbins=9, hog_bias=hog_bias, lr=1e-3)
    path = tmp_path / 'localmim.pth'
    torch.save({'model': state, 'args': args, 'epoch': 99}, path)
    return model, path


@pytest.mark.parametrize('hog_bias', [False, True])
def test_localmim_layout_gives_the_same_loss_as_our_layout(tmp_path, hog_bias, capsys):
    ours, path = localmim_checkpoint(tmp_path, hog_bias)
    ckpt = load_checkpoint_file(path)  # the original pickles argparse.Namespace: allowed, nothing else
    loaded = models_mim.build(models_mim.saved_args(ckpt))
    models_mim.load_weights(loaded, ckpt['model'])
    assert 'newly initialised' not in capsys.readouterr().out  # every weight, the HOG biases too, came from the file
    if hog_bias:
        assert torch.equal(loaded.hog.grad_bias, ours.hog.grad_bias)
    imgs, noise = torch.randn(2, 3, 32, 32), torch.rand(2, 64)
    torch.testing.assert_close(loaded(imgs, 0.75, noise)[0], ours(imgs, 0.75, noise)[0], rtol=0, atol=0)


@pytest.mark.slow
def test_localmim_layout_fine_tunes_probes_and_draws(tmp_path, small_data):
    ours, path = localmim_checkpoint(tmp_path)
    classifier = models_vit.vit_tiny_patch4(num_classes=10, global_pool=False)
    models_vit.load_pretrained(classifier, path)
    assert torch.equal(classifier.norm.weight, ours.tap_norms[3].weight)  # the last tap's norm reads the final block
    run_script('run_knn.py', '--model', 'vit_tiny_patch4', '--input_size', '32', '--num_workers', '0',
               '--finetune', path, '--data_path', small_data, '--output_dir', tmp_path / 'knn')
    run_script('visualize.py', '--checkpoint', path, '--data_path', small_data, '--num_images', '1',
               '--output_dir', tmp_path / 'vis')
    assert len(list((tmp_path / 'vis').glob('*.png'))) == 1
    proc = run_script('run_pretrain.py', '--model', 'MIM_vit_tiny_patch4', '--input_size', '32', '--batch_size', '16',
                      '--num_workers', '0', '--epochs', '1', '--warmup_epochs', '0.5', '--init_from', path,
                      '--data_path', small_data, '--output_dir', tmp_path / 'pre')
    assert f'Initialised from the weights of {path}' in proc.stdout


def test_mae_layouts_load(tmp_path):
    """facebookresearch/mae: pre-training with decoder (its names are ours), encoder only, and fine-tuned."""
    torch.manual_seed(0)
    mae = models_mim.mae_vit_tiny_patch4()
    full = mae.state_dict()
    fresh = models_mim.mae_vit_tiny_patch4()
    models_mim.load_weights(fresh, full)
    assert torch.equal(fresh.decoder_pred.weight, mae.decoder_pred.weight)
    encoder_only = {k: v for k, v in full.items() if k.startswith(models_mim.ENCODER_KEYS) or k.startswith('norm.')}
    models_mim.load_weights(models_mim.mae_vit_tiny_patch4(), encoder_only)  # fresh decoder
    torch.save({'model': encoder_only, 'args': argparse.Namespace(model='mae_vit_tiny_patch4')}, tmp_path / 'enc.pth')
    clf = models_vit.vit_tiny_patch4(num_classes=10, global_pool=False)
    models_vit.load_pretrained(clf, tmp_path / 'enc.pth')
    assert torch.equal(clf.norm.weight, mae.norm.weight)
    finetuned = models_vit.vit_tiny_patch4(num_classes=1000).state_dict()  # fc_norm + head, as MAE fine-tuning writes
    torch.save({'model': finetuned}, tmp_path / 'ft.pth')
    assert models_vit.load_pretrained(models_vit.vit_tiny_patch4(num_classes=10), tmp_path / 'ft.pth') == \
        ['head.bias', 'head.weight']


def test_an_unknown_layout_names_its_keys():
    with pytest.raises(UsageError, match=r"missing keys \['blocks.0.attn.proj.bias'.*unexpected keys \['stem.conv'"):
        models_mim.load_weights(models_mim.MIM_vit_tiny_patch4(),
                                {'stem.conv': torch.zeros(1), **{k: v for k, v in models_mim.MIM_vit_tiny_patch4()
                                                                 .state_dict().items() if not k.startswith('blocks.0.')}})
