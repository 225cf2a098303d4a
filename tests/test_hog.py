import math

import torch

from util.hog import HOGTarget


def edge_image(vertical=True, size=32):
    img = torch.zeros(1, 3, size, size)
    if vertical:
        img[..., :, : size // 2] = 1.
    else:
        img[..., : size // 2, :] = 1.
    return img


def votes_per_bin(hist, nbins, channel=0):
    """Sum over cells of one colour channel's histogram: (nbins,)."""
    return hist[0, :, channel * nbins:(channel + 1) * nbins].sum(0)


def test_shapes_and_layout():
    hog = HOGTarget(nbins=9, cell_sizes=(4, 8, 16, 32))
    out = hog(torch.randn(2, 3, 64, 64))
    assert [o.shape for o in out] == [(2, 256, 27), (2, 64, 27), (2, 16, 27), (2, 4, 27)]


def test_vertical_edge_votes_into_expected_bin():
    nbins = 8
    hist = HOGTarget(nbins, cell_sizes=(4,))(edge_image(vertical=True))[0]
    # gx > 0, gy = 0 on a vertical edge: atan2(gx, gy) = pi/2 -> bin nbins/2
    votes = votes_per_bin(hist, nbins)
    assert votes.argmax().item() == nbins // 2
    assert votes.sum() == votes[nbins // 2]


def test_rotation_by_90_degrees_moves_votes_by_half_the_bins():
    # 6 bins: boundaries at multiples of pi/6, which integer gradients never hit exactly except on the
    # axes (tan(pi/6) is irrational); with 8 bins |gx| = |gy| sits on a boundary and rounds either way
    nbins = 6
    hog = HOGTarget(nbins, cell_sizes=(4,))
    # integer pixels (as in 8-bit photos) make the Sobel sums exact, so border pixels with a
    # gradient exactly on a bin boundary are not flipped by float rounding
    img = torch.randint(0, 256, (1, 3, 32, 32)).float()
    v0 = votes_per_bin(hog(img)[0], nbins)
    v90 = votes_per_bin(hog(torch.rot90(img, 1, dims=(2, 3)))[0], nbins)
    # orientations are unsigned (mod pi), so a quarter turn is a shift by nbins/2 in either direction
    assert torch.allclose(torch.roll(v0, nbins // 2), v90, atol=1e-3)


def test_cells_have_unit_norm_per_channel():
    nbins = 9
    out = HOGTarget(nbins, cell_sizes=(2, 8))(torch.randn(2, 3, 32, 32))
    for hist in out:
        norms = hist.view(*hist.shape[:2], 3, nbins).norm(dim=-1)
        assert torch.allclose(norms, torch.ones_like(norms), atol=1e-5)


def test_flat_image_gives_zeros_without_bias_and_votes_with_bias():
    flat = torch.full((1, 3, 16, 16), 0.3)
    assert HOGTarget(9, (4,))(flat)[0].abs().max() == 0
    assert HOGTarget(9, (4,), bias=True)(flat)[0].abs().max() > 0


def test_hog_bias_is_per_scale_and_direction_shared_by_colours():
    """As LocalMIM's HOG layers: per scale, one bias for gx and one for gy, U(-1/3, 1/3); on a flat image
    every pixel of every colour votes into the bin of that scale's (bx, by), with magnitude |b|."""
    nbins = 9
    hog = HOGTarget(nbins, (4, 8, 16), bias=True)
    b = hog.grad_bias
    assert b.shape == (3, 2) and b.abs().max() <= 1 / 3 and len({tuple(r) for r in b.tolist()}) == 3
    flat = torch.full((1, 3, 16, 16), -0.7)
    for out, (bx, by) in zip(hog(flat), b.tolist()):
        if bx < 0 or (bx == 0 and by < 0):
            bx, by = -bx, -by
        expected = int(math.floor(math.atan2(bx, by) * nbins / math.pi)) % nbins
        hist = out[0].view(-1, 3, nbins)  # every cell, every colour: one-hot at the expected bin
        assert torch.allclose(hist[:, :, expected], torch.ones(hist.shape[:2]))


def test_coarse_cells_pool_fine_cells():
    """One pass: the 8-px histograms equal the normalised sum of the 4-px cells' votes they contain."""
    nbins = 9
    img = torch.randn(1, 3, 16, 16)
    direct = HOGTarget(nbins, (8,))(img)[0]
    both = HOGTarget(nbins, (4, 8))(img)
    assert torch.allclose(both[1], direct, atol=1e-6)


def test_fp32_no_grad_under_autocast():
    img = torch.randn(1, 3, 16, 16, requires_grad=True)
    with torch.autocast('cpu', dtype=torch.bfloat16):
        out = HOGTarget(9, (4,))(img)[0]
    assert out.dtype == torch.float32 and not out.requires_grad


def test_bin_formula_matches_hand_computation():
    """A single diagonal ramp: gx = gy, phase pi/4 -> bin floor(nbins/4)."""
    nbins = 9
    y, x = torch.meshgrid(torch.arange(16.), torch.arange(16.), indexing='ij')
    img = (-(x + y)).expand(1, 3, 16, 16).contiguous()
    hist = HOGTarget(nbins, (16,))(img[..., :, :])[0]
    assert votes_per_bin(hist, nbins).argmax().item() == math.floor(nbins / 4)
