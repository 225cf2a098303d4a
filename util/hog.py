"""Multi-scale HOG targets (MaskFeat-style, per cell) for LocalMIM.

Gradients, orientations and votes are computed once per batch; every cell
size is then an average pool of the per-pixel votes (coarser cells pool the
finer cells they are made of), followed by a per-channel L2 normalisation.
"""
import math

import torch
import torch.nn as nn
import torch.nn.functional as F


class HOGTarget(nn.Module):
    def __init__(self, nbins=9, cell_sizes=(4, 8, 16, 32), bias=False):
        super().__init__()
        self.nbins = nbins
        self.cell_sizes = tuple(int(c) for c in cell_sizes)
        sobel_x = torch.tensor([[1., 0., -1.], [2., 0., -2.], [1., 0., -1.]])
        # (6, 1, 3, 3): x then y kernel for each of R, G, B (depthwise conv)
        kernels = torch.stack([sobel_x, sobel_x.t()]).repeat(3, 1, 1).unsqueeze(1)
        self.register_buffer('kernels', kernels, persistent=False)
        if bias:
            # LocalMIM's --hog_bias (ViT-L): each scale's gradient convolution has its own bias per direction
            # (gx, gy), shared by the colour channels, drawn as PyTorch's default bias of a 1-channel 3x3
            # conv, U(-1/3, 1/3). Fixed seeds (one per scale) so that every run starts alike; saved with the
            # model, so that biases loaded from a Haoqing-Wang/LocalMIM checkpoint stay with the run.
            draws = [torch.rand(2, generator=torch.Generator().manual_seed(k)) for k in range(len(self.cell_sizes))]
            self.register_buffer('grad_bias', (torch.stack(draws) * 2 - 1) / 3)  # (scales, 2)
        else:
            self.grad_bias = None

    def _load_from_state_dict(self, state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                              error_msgs):
        super()._load_from_state_dict(state_dict, prefix, local_metadata, strict, missing_keys, unexpected_keys,
                                      error_msgs)
        if prefix + 'grad_bias' in missing_keys:  # a checkpoint from before the biases were saved trained with
            missing_keys.remove(prefix + 'grad_bias')  # the fixed-seed ones: keep them

    @torch.no_grad()
    def forward(self, imgs):
        """imgs: normalised (B, 3, H, W). Returns one (B, (H/c)*(W/c), 3*nbins) tensor per cell size."""
        B, C, H, W = imgs.shape
        for c in self.cell_sizes:
            if H % c or W % c:
                raise ValueError(f"HOG cell size {c} does not divide the image size {H}x{W}")
        with torch.autocast(device_type=imgs.device.type, enabled=False):
            x = F.pad(imgs.float(), (1, 1, 1, 1), mode='reflect')
            grads = F.conv2d(x, self.kernels, groups=3)  # (B, 6, H, W)
            gx, gy = grads[:, 0::2], grads[:, 1::2]  # (B, 3, H, W) each
            if self.grad_bias is not None:  # votes of each scale's own biased gradients, read on the device
                return [self._normalise(F.avg_pool2d(self._votes(gx + b[0], gy + b[1]), c))
                        for c, b in zip(self.cell_sizes, self.grad_bias)]
            votes = self._votes(gx, gy)
            pooled, prev_cell, prev = {}, 1, votes
            for c in sorted(self.cell_sizes):
                src, k = (prev, c // prev_cell) if c % prev_cell == 0 else (votes, c)
                prev = F.avg_pool2d(src, k) if k > 1 else src
                prev_cell = c
                pooled[c] = prev
            return [self._normalise(pooled[c]) for c in self.cell_sizes]

    def _votes(self, gx, gy):
        """Per-pixel orientation votes (B, 3*nbins, H, W), channel-major: [R bins | G bins | B bins]."""
        B, _, H, W = gx.shape
        magnitude = torch.sqrt(gx * gx + gy * gy)
        # Unsigned orientation: fold g and -g onto gx >= 0 before atan2, so that exactly opposite
        # gradients (common: reflect padding gives gx = 0 on the border) share a bin; binning the
        # signed angle sends +pi/2 and -pi/2 to different bins through float rounding.
        flip = (gx < 0) | ((gx == 0) & (gy < 0))
        phase = torch.atan2(torch.where(flip, -gx, gx), torch.where(flip, -gy, gy))  # [0, pi]
        bins = torch.floor(phase * (self.nbins / math.pi)).long().remainder_(self.nbins)
        votes = torch.zeros(B, 3, self.nbins, H, W, device=gx.device)
        votes.scatter_(2, bins.unsqueeze(2), magnitude.unsqueeze(2))
        return votes.flatten(1, 2)

    def _normalise(self, hist):
        B, _, h, w = hist.shape
        hist = hist.view(B, 3, self.nbins, h, w)
        hist = F.normalize(hist, p=2, dim=2)
        return hist.permute(0, 3, 4, 1, 2).reshape(B, h * w, 3 * self.nbins)  # (B, h*w, 3*nbins), row-major cells
