"""SimCLR's augmentations, vectorised over the batch with independent random parameters per image.

Runs on whatever device the images are on (the training device), so a two-core CPU does not spend
its time in a per-image PIL pipeline. uint8 [N, 3, H, W] in, float [N, 3, S, S] (normalised) out:

1. random resized crop (scale U(lo, hi) of the area, aspect ratio log-U(3/4, 4/3), up to 10 tries
   then the whole image, as torchvision) + horizontal flip p=0.5, as one sampling grid per image
   and one `grid_sample` (bilinear) for the batch;
2. colour jitter with strength s, with probability p=0.8: brightness 0.8s, contrast 0.8s,
   saturation 0.8s, hue 0.2s, in a random order drawn per image (as torchvision's ColorJitter);
3. grayscale with p=0.2;
4. normalisation by mean/std;
5. Gaussian blur with p=0.5 (sigma U(0.1, 2.0), kernel 10% of the side) when enabled
   (the paper uses it for ImageNet-sized inputs, not CIFAR). Blur is linear per channel with
   weights summing to one, so blurring after the normalisation gives the same result as before it.

Every colour operation is linear in RGB, so steps 2-4 compose into one 3x3 matrix and offset per
image, built on [N, 3, 3] tensors and applied with two batched matrix products (one clamp to
[0, 1] between the jitter and the grayscale/normalisation). That is what makes the pipeline a few
percent of a training step on a CPU instead of a quarter. The two places where it departs from
torchvision's ColorJitter, both deliberate:
- hue is a rotation of RGB about the grey axis (the SVG/CSS `hue-rotate`), not a shift in HSV; the
  two agree exactly at multiples of a third of a turn (a channel permutation) and both keep greys
  grey, but the rotation is linear and the HSV shift is not;
- the image is clamped to [0, 1] once after the four jitter operations, not after each of them.

All randomness comes from the `torch.Generator` passed in (on the images' device), so a seed
reproduces the views exactly.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Sequence

import torch
import torch.nn.functional as F

_GRAY = (0.299, 0.587, 0.114)
BRIGHTNESS, CONTRAST, SATURATION, HUE = range(4)


class SimCLRAugment:
    def __init__(
        self,
        image_size: int,
        mean: Sequence[float],
        std: Sequence[float],
        *,
        strength: float = 0.5,
        crop_scale: tuple[float, float] = (0.2, 1.0),
        jitter_p: float = 0.8,
        grayscale_p: float = 0.2,
        blur: bool = False,
        blur_p: float = 0.5,
        flip_p: float = 0.5,
    ) -> None:
        self.size = image_size
        self.mean, self.std = tuple(mean), tuple(std)
        self.strength, self.crop_scale = strength, crop_scale
        self.jitter_p, self.grayscale_p, self.flip_p = jitter_p, grayscale_p, flip_p
        self.blur, self.blur_p = blur, blur_p

    def __call__(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"expected uint8 [N, 3, H, W]; got {images.dtype} {tuple(images.shape)}")
        n, size = images.shape[0], self.size
        rand = _Rand(generator, images.device)
        x = self.crop_flip(images.float(), rand).view(n, 3, size * size)  # still 0..255
        # colour jitter (1/255 folded in), then one clamp
        matrix, offset = self.jitter_matrix(x.mean(2), rand)
        x = torch.baddbmm(offset[:, :, None], matrix, x).clamp_(0, 1)
        # grayscale and normalisation: one more matrix per image
        gray = rand.u(n) < self.grayscale_p
        k = _constants(x.device, x.dtype)
        mix = torch.where(gray[:, None, None], k.to_gray, k.eye)
        mean = torch.tensor(self.mean, device=x.device, dtype=x.dtype)
        std = torch.tensor(self.std, device=x.device, dtype=x.dtype)
        x = torch.baddbmm((-mean / std).expand(n, 3)[:, :, None], mix / std[:, None], x).view(n, 3, size, size)
        if self.blur:
            x = self.gaussian_blur(x, rand.u(n) < self.blur_p, rand)
        return x

    def crop_flip(self, x: torch.Tensor, rand: _Rand) -> torch.Tensor:
        n, _, h, w = x.shape
        tries = 10
        lo, hi = self.crop_scale
        area = lo + (hi - lo) * rand.u(n, tries)
        log_ratio = math.log(3 / 4) + (math.log(4 / 3) - math.log(3 / 4)) * rand.u(n, tries)
        ratio = torch.exp(log_ratio) * h / w  # pixel aspect ratio -> ratio of normalised sides
        cw, ch = torch.sqrt(area * ratio), torch.sqrt(area / ratio)  # fractions of width / height
        ok = (cw <= 1) & (ch <= 1)
        first = torch.where(ok.any(1), ok.float().argmax(1), torch.full((n,), -1, device=x.device))
        pick = first.clamp(min=0)[:, None]
        cw = torch.where(first >= 0, cw.gather(1, pick)[:, 0], torch.ones(n, device=x.device))
        ch = torch.where(first >= 0, ch.gather(1, pick)[:, 0], torch.ones(n, device=x.device))
        cx = cw / 2 + (1 - cw) * rand.u(n)
        cy = ch / 2 + (1 - ch) * rand.u(n)
        flip = torch.where(rand.u(n) < self.flip_p, -1.0, 1.0)
        # the sampling grid of affine_grid (align_corners=False) for a scale + offset, built from its
        # two separable axes (affine_grid's general path costs more than the sampling itself)
        s = self.size
        base = (2 * torch.arange(s, device=x.device, dtype=x.dtype) + 1) / s - 1  # pixel centres in [-1, 1]
        gx = (cw * flip)[:, None] * base + (2 * cx - 1)[:, None]  # [n, s]
        gy = ch[:, None] * base + (2 * cy - 1)[:, None]
        grid = torch.stack((gx[:, None, :].expand(n, s, s), gy[:, :, None].expand(n, s, s)), dim=-1)
        return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)

    def jitter_matrix(self, channel_mean: torch.Tensor, rand: _Rand) -> tuple[torch.Tensor, torch.Tensor]:
        """Per-image colour jitter of 0..255 pixels as `matrix` [n, 3, 3] and `offset` [n, 3] (result in 0..1)."""
        n = channel_mean.shape[0]
        s = self.strength
        apply = rand.u(n) < self.jitter_p

        def factor(spread: float, centre: float) -> torch.Tensor:
            f = centre - spread + 2 * spread * rand.u(n)
            return torch.where(apply, f, torch.full_like(f, centre))  # identity when not applied

        factors = torch.stack(
            [factor(0.8 * s, 1.0).clamp(min=0), factor(0.8 * s, 1.0).clamp(min=0), factor(0.8 * s, 1.0).clamp(min=0),
             factor(min(0.2 * s, 0.5), 0.0)], dim=1)
        order = torch.argsort(rand.u(n, 4), dim=1)  # a random order of the four ops per image
        return jitter_matrix(channel_mean, factors, order, scale=1 / 255)

    def gaussian_blur(self, x: torch.Tensor, apply: torch.Tensor, rand: _Rand) -> torch.Tensor:
        n, c, h, w = x.shape
        k = max(3, int(0.1 * self.size) // 2 * 2 + 1)
        sigma = 0.1 + 1.9 * rand.u(n)
        t = torch.arange(k, device=x.device, dtype=x.dtype) - k // 2
        kern = torch.exp(-(t[None] ** 2) / (2 * sigma[:, None] ** 2))
        kern = kern / kern.sum(1, keepdim=True)
        delta = (t == 0).to(x.dtype).expand(n, k)
        kern = torch.where(apply[:, None], kern, delta).repeat_interleave(c, 0)  # [n*c, k]
        y = F.pad(x.reshape(1, n * c, h, w), (k // 2, k // 2, k // 2, k // 2), mode="reflect")
        y = F.conv2d(y, kern.view(n * c, 1, 1, k), groups=n * c)
        y = F.conv2d(y, kern.view(n * c, 1, k, 1), groups=n * c)
        return y.view(n, c, h, w)


def jitter_matrix(
    channel_mean: torch.Tensor, factors: torch.Tensor, order: torch.Tensor, scale: float = 1.0
) -> tuple[torch.Tensor, torch.Tensor]:
    """Compose brightness, contrast, saturation and hue into one affine map per image: x' = matrix @ x + offset.

    channel_mean [n, 3]: the input images' per-channel means (contrast blends towards the mean grey
    level of the image as it is at that point, which the map carries along); factors [n, 4]:
    brightness, contrast and saturation factors (1 = identity) and the hue shift in turns
    (0 = identity); order [n, 4]: the operations (BRIGHTNESS, CONTRAST, SATURATION, HUE) in the order
    each image gets them; scale: applied to the input first (1/255 for 0..255 pixels).
    Returns matrix [n, 3, 3] and offset [n, 3].
    """
    n, device, dtype = factors.shape[0], factors.device, factors.dtype
    k = _constants(device, dtype)
    matrix, offset = (k.eye * scale).expand(n, 3, 3), torch.zeros(n, 3, device=device, dtype=dtype)
    b, c, s, h = factors.unbind(1)
    # the linear part of each op, [n, 4 ops, 3, 3]
    sat = s[:, None, None] * k.eye + (1 - s)[:, None, None] * k.to_gray
    linear = torch.stack([b[:, None, None] * k.eye, c[:, None, None] * k.eye, sat, _hue_rotation(h)], dim=1)
    rows = torch.arange(n, device=device)
    for step in range(4):
        op = order[:, step]
        a = linear[rows, op]  # [n, 3, 3]
        # contrast also pulls towards the image's current mean grey level: (1 - c) * mean_grey
        mean_grey = (torch.bmm(matrix, channel_mean[:, :, None])[:, :, 0] + offset) @ k.gray  # [n]
        shift = torch.where(op == CONTRAST, (1 - c) * mean_grey, 0.0)[:, None]
        matrix, offset = torch.bmm(a, matrix), torch.bmm(a, offset[:, :, None])[:, :, 0] + shift
    return matrix, offset


def _hue_rotation(turns: torch.Tensor) -> torch.Tensor:
    """[n] hue shifts in turns -> [n, 3, 3] rotations of RGB about the grey axis (red -> green for > 0)."""
    k = _constants(turns.device, turns.dtype)
    theta = 2 * math.pi * turns
    cos, sin = torch.cos(theta)[:, None, None], torch.sin(theta)[:, None, None]
    return cos * k.eye + sin * k.cross + (1 - cos) * k.axis  # Rodrigues' formula


class _Constants:
    def __init__(self, device: torch.device, dtype: torch.dtype) -> None:
        def t(values: object) -> torch.Tensor:
            return torch.tensor(values, device=device, dtype=dtype)

        self.eye = torch.eye(3, device=device, dtype=dtype)
        self.gray = t(_GRAY)
        self.to_gray = self.gray.expand(3, 3).contiguous()  # every channel becomes the luma
        self.axis = torch.full((3, 3), 1 / 3, device=device, dtype=dtype)  # k k^T for the grey axis k
        self.cross = t([[0.0, -1.0, 1.0], [1.0, 0.0, -1.0], [-1.0, 1.0, 0.0]]) / math.sqrt(3)  # v -> k x v


@functools.cache
def _constants(device: torch.device, dtype: torch.dtype) -> _Constants:
    return _Constants(device, dtype)


class _Rand:
    """Uniform draws from one generator on one device."""

    def __init__(self, generator: torch.Generator, device: torch.device) -> None:
        self.g, self.device = generator, device

    def u(self, *shape: int) -> torch.Tensor:
        return torch.rand(*shape, generator=self.g, device=self.device)
