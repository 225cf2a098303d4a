"""Linear probing: frozen pre-trained encoder, BatchNorm (no affine) + linear head, LARS (MAE)."""
import argparse

import torch
from timm.optim import Lars

import models_vit
import util.misc as misc
from util import checkpoint
from engine_finetune import resume_then_evaluate_or_fit
from util.datasets import build_classification_loaders, eval_transform
from util.pipeline import LOADERS


def get_args_parser():
    p = argparse.ArgumentParser('ViT linear probing')
    p.add_argument('--batch_size', default=512, type=int, help='per-GPU batch; effective = batch_size * accum_iter * GPUs')
    p.add_argument('--epochs', default=90, type=int)
    p.add_argument('--accum_iter', default=1, type=int)
    p.add_argument('--model', default='vit_base_patch16', help=f'one of {", ".join(models_vit.MODELS)}')
    p.add_argument('--input_size', default=224, type=int)
    p.add_argument('--finetune', default='', help='pre-training checkpoint (LocalMIM or MAE) to probe')
    p.add_argument('--global_pool', action='store_true', default=False, help='mean of patch tokens (+ fc_norm)')
    p.add_argument('--cls_token', action='store_false', dest='global_pool', help='cls token after the final norm (default)')
    p.add_argument('--nb_classes', default=None, type=int, help='default: the number of class folders found')
    p.add_argument('--weight_decay', type=float, default=0.)
    p.add_argument('--lr', type=float, default=None, help='absolute lr (default: blr * effective batch / 256)')
    p.add_argument('--blr', type=float, default=0.1, help='base lr for an effective batch of 256')
    p.add_argument('--min_lr', type=float, default=0.)
    p.add_argument('--warmup_epochs', type=float, default=10)
    p.add_argument('--eval', action='store_true', help='only evaluate --resume on val/')
    p.add_argument('--dist_eval', action='store_true', help='shard evaluation over the processes')
    p.add_argument('--loader', choices=LOADERS, default='fast',
                   help='training images: fast (uint8, torch resize), roi (crop-box decode), pil (PIL resize), device (decode on '
                        'the GPU) or hw (crop-box decode on the GPU\'s hardware JPEG decoder); see util/pipeline.py')
    misc.add_run_args(p, './output_dir_linprobe')
    return p


def main(args):
    device = misc.setup_run(args)
    train_loader, val_loader, train_sampler = build_classification_loaders(
        args, None, eval_transform(args.input_size))
    resume = checkpoint.load_resume_checkpoint(args)  # (path, checkpoint), ('', {}) when starting
    args.accum_iter = checkpoint.run_accumulation(args, *resume)
    misc.set_schedule_steps(args, len(train_loader))
    args.train_images = len(train_loader.dataset)
    args.clip_grad = None

    encoder = models_vit.build(args.model, img_size=args.input_size, num_classes=0, global_pool=args.global_pool,
                               **models_vit.checkpoint_kwargs(args.resume or args.finetune))
    if args.finetune and not args.eval:
        models_vit.load_pretrained(encoder, args.finetune)
    model = models_vit.LinearProbe(encoder, args.nb_classes).to(device)
    misc.scale_lr(args)

    # LARS adapts the head's weight; its bias is a plain momentum-SGD parameter (MAE's LARS rule)
    head = model.head[1]
    optimizer = Lars([{'params': [head.weight], 'always_adapt': True},
                      {'params': [head.bias], 'weight_decay': 0.}], lr=args.lr, momentum=0.9,
                     weight_decay=args.weight_decay)
    loss_scaler = misc.LossScaler(device.type, enabled=args.amp == 'fp16')
    resume_then_evaluate_or_fit(args, model, torch.nn.CrossEntropyLoss(), train_loader, val_loader, train_sampler,
                                optimizer, loss_scaler, device, resume)


if __name__ == '__main__':
    misc.run_main(main, get_args_parser())
