"""What a pre-trained model predicts: for each image one PNG with the input, the masked input and, for
LocalMIM (ViT and Swin), the HOG target and prediction at every scale (oriented-edge glyphs: each cell draws
one line per orientation bin, along the edge, as long as the bin's vote) or, with pixel targets, each stage's
prediction; for MAE the pixel reconstruction.

  python visualize.py --checkpoint output_dir/checkpoint-last.pth --num_images 4 --output_dir vis/
  python visualize.py --checkpoint ... --images cat.jpg dog.jpg
"""
import argparse
import math
from pathlib import Path

import matplotlib
matplotlib.use('Agg')
import matplotlib.pyplot as plt
import torch
from matplotlib.collections import LineCollection
from PIL import Image
from timm.data.constants import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD

import models_common
import models_mim
from util.datasets import eval_transform, image_folder
import util.misc as misc
from util.checkpoint import load_checkpoint_file


def get_args_parser():
    p = argparse.ArgumentParser('visualise LocalMIM / MAE predictions')
    p.add_argument('--checkpoint', required=True, help='pre-training checkpoint of this codebase')
    p.add_argument('--images', nargs='*', default=[], help='image files (default: the first val images)')
    p.add_argument('--data_path', default=None, help='where to take val images from (default: embedded data)')
    p.add_argument('--num_images', type=int, default=4)
    p.add_argument('--mask_ratio', type=float, default=0.75)
    p.add_argument('--seed', type=int, default=0, help='of the masks')
    p.add_argument('--output_dir', default='visualizations')
    return p


def load_model(path):
    """The full pre-training model of a checkpoint, this project's or a released one (decoders mapped)."""
    ckpt = load_checkpoint_file(path)
    saved = models_mim.saved_args(ckpt)
    model = models_mim.build(saved)
    models_mim.load_weights(model, ckpt.get('model', ckpt))
    return model.eval(), saved


def to_display(img):
    """Normalised (3, H, W) -> (H, W, 3) in [0, 1]."""
    mean, std = torch.tensor(IMAGENET_DEFAULT_MEAN)[:, None, None], torch.tensor(IMAGENET_DEFAULT_STD)[:, None, None]
    return (img * std + mean).clamp(0, 1).permute(1, 2, 0).numpy()


def masked_input(img, mask):
    """Masked patches (or Swin mask units) greyed out; mask (g*g,) on a square grid."""
    g = math.isqrt(mask.numel())
    patch = img.shape[-1] // g
    keep = (1 - mask).view(g, g).repeat_interleave(patch, 0).repeat_interleave(patch, 1)
    shown = to_display(img)
    return shown * keep[..., None].numpy() + 0.5 * (1 - keep[..., None].numpy())


def draw_hog(ax, hist, nbins, image_size, title):
    """hist: (h*w, 3*nbins); RGB histograms averaged; one line per bin along the edge direction."""
    cells = int(math.sqrt(hist.shape[0]))
    h = hist.view(cells, cells, 3, nbins).mean(2).clamp(min=0)
    h = h / h.max().clamp(min=1e-6)
    size = image_size / cells
    segments, widths = [], []
    for r in range(cells):
        for c in range(cells):
            cy, cx = (r + 0.5) * size, (c + 0.5) * size
            for b in range(nbins):
                # bin b holds gradients at angle theta from the vertical axis: (gx, gy) ~ (sin, cos);
                # the edge runs across the gradient
                theta = (b + 0.5) * math.pi / nbins
                dx, dy = math.cos(theta) * size / 2 * h[r, c, b].item(), -math.sin(theta) * size / 2 * h[r, c, b].item()
                segments.append([(cx - dx, cy - dy), (cx + dx, cy + dy)])
                widths.append(0.4 + 1.2 * h[r, c, b].item())
    ax.add_collection(LineCollection(segments, colors='white', linewidths=widths))
    ax.set_xlim(0, image_size)
    ax.set_ylim(image_size, 0)
    ax.set_facecolor('black')
    ax.set_title(title, fontsize=8)


@torch.no_grad()
def figure(model, img, mask_ratio=0.75, seed=0):
    """A matplotlib figure for one normalised image (3, H, W); the training RNG is left untouched."""
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return _figure(model, img, mask_ratio)


def cells_to_image(x, size):
    """(cells, c*c*3) pixel predictions, each cell (c, c, 3) row-major, -> (3, size, size)."""
    return models_common.unpatchify(x[None], size // math.isqrt(x.shape[0]))[0]


def _figure(model, img, mask_ratio):
    img = img.cpu()
    x = img.unsqueeze(0).to(next(model.parameters()).device)
    if hasattr(model, 'decoders'):  # LocalMIM: one column per tap
        out, mask = model.forward_predictions(x, mask_ratio)
        out = {k: [t.float().cpu() for t in v] for k, v in out.items()}
        cols = 2 + len(out)
        fig, axes = plt.subplots(2, cols, figsize=(2.4 * cols, 5))
        for col, (k, (pred, target, _)) in enumerate(out.items(), start=2):
            name = model.loss_names()[k].removeprefix('loss_')
            if model.hog is not None:
                draw_hog(axes[0, col], target[0], model.hog.nbins, img.shape[-1], f'HOG target ({name})')
                draw_hog(axes[1, col], pred[0], model.hog.nbins, img.shape[-1], f'prediction ({name})')
            else:  # pixels; per-cell normalised targets are shown as such
                axes[0, col].imshow(to_display(cells_to_image(target[0], img.shape[-1])))
                axes[1, col].imshow(to_display(cells_to_image(pred[0], img.shape[-1])))
                axes[0, col].set_title(f'target ({name})', fontsize=8)
                axes[1, col].set_title(f'prediction ({name})', fontsize=8)
    else:
        pred, mask = model.forward_predictions(x, mask_ratio)
        pred, x = pred.float().cpu(), x.cpu()
        target = model.patchify(x)
        if model.norm_pix_loss:  # predictions are per-patch normalised: use the true patch statistics
            mean, var = target.mean(-1, keepdim=True), target.var(-1, keepdim=True)
            pred = pred * (var + 1e-6) ** .5 + mean
        m = mask[0][:, None]
        recon = model.unpatchify(pred * m + target * (1 - m))[0]
        fig, axes = plt.subplots(2, 3, figsize=(7.2, 5))
        axes[0, 2].imshow(to_display(model.unpatchify(pred)[0]))
        axes[0, 2].set_title('prediction', fontsize=8)
        axes[1, 2].imshow(to_display(recon))
        axes[1, 2].set_title('prediction + visible', fontsize=8)
    axes[0, 0].imshow(to_display(img))
    axes[0, 0].set_title('input', fontsize=8)
    axes[0, 1].imshow(masked_input(img, mask[0].cpu()))
    axes[0, 1].set_title(f'masked ({mask_ratio:.0%})', fontsize=8)
    for ax in axes.flat:
        ax.set_xticks([])
        ax.set_yticks([])
    for ax in axes[1, :2]:
        ax.axis('off')
    fig.tight_layout()
    return fig


def main(args):
    model, saved = load_model(args.checkpoint)
    transform = eval_transform(saved.input_size)
    if args.images:
        images = [(Path(p).stem, transform(Image.open(p).convert('RGB'))) for p in args.images]
    else:
        val = image_folder(args.data_path, 'val', transform)
        step = max(1, len(val) // args.num_images)  # spread over the classes
        images = [(f'val{i:05d}', val[i][0]) for i in range(0, step * args.num_images, step)]
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    for name, img in images:
        fig = figure(model, img, args.mask_ratio, args.seed)
        fig.savefig(out / f'{name}.png', dpi=100)
        plt.close(fig)
        print(f'wrote {out / name}.png')


if __name__ == '__main__':
    misc.run_main(main, get_args_parser())
