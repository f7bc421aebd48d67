"""SimCLR's augmentations, vectorised over the batch with independent random parameters per image.

Runs on whatever device the images are on (the training device), so a two-core CPU does not spend
its time in a per-image PIL pipeline. uint8 [N, 3, H, W] in, float [N, 3, S, S] (normalised) out:

1. random resized crop (scale U(lo, hi) of the area, aspect ratio log-U(3/4, 4/3), up to 10 tries
   then the whole image, as torchvision) + horizontal flip p=0.5, as one affine grid per image
   and one `grid_sample` (bilinear) for the batch;
2. colour jitter with strength s, with probability p=0.8: brightness 0.8s, contrast 0.8s,
   saturation 0.8s, hue 0.2s, in a random order drawn per image (as torchvision's ColorJitter);
3. grayscale with p=0.2;
4. Gaussian blur with p=0.5 (sigma U(0.1, 2.0), kernel 10% of the side) when enabled
   (the paper uses it for ImageNet-sized inputs, not CIFAR);
5. normalisation by mean/std.

All randomness comes from the `torch.Generator` passed in (on the images' device), so a seed
reproduces the views exactly.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
import torch.nn.functional as F

_GRAY = (0.299, 0.587, 0.114)


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
        hue_subset: bool | None = None,
    ) -> None:
        self.size = image_size
        self.mean, self.std = tuple(mean), tuple(std)
        self.strength, self.crop_scale = strength, crop_scale
        self.jitter_p, self.grayscale_p, self.flip_p = jitter_p, grayscale_p, flip_p
        self.blur, self.blur_p = blur, blur_p
        self.hue_subset = hue_subset  # None: on the CPU only (see color_jitter)

    def __call__(self, images: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
        if images.dtype != torch.uint8 or images.dim() != 4 or images.shape[1] != 3:
            raise ValueError(f"expected uint8 [N, 3, H, W]; got {images.dtype} {tuple(images.shape)}")
        n = images.shape[0]
        rand = _Rand(generator, images.device)
        x = images.float().div_(255)
        x = self.crop_flip(x, rand)
        apply = rand.u(n) < self.jitter_p
        x = self.color_jitter(x, apply, rand)
        gray = rand.u(n) < self.grayscale_p
        x = torch.where(gray[:, None, None, None], _grayscale(x).expand_as(x), x)
        if self.blur:
            x = self.gaussian_blur(x, rand.u(n) < self.blur_p, rand)
        mean = torch.tensor(self.mean, device=x.device).view(1, 3, 1, 1)
        std = torch.tensor(self.std, device=x.device).view(1, 3, 1, 1)
        return x.sub_(mean).div_(std)

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
        theta = torch.zeros(n, 2, 3, device=x.device)
        theta[:, 0, 0] = cw * flip
        theta[:, 0, 2] = 2 * cx - 1
        theta[:, 1, 1] = ch
        theta[:, 1, 2] = 2 * cy - 1
        grid = F.affine_grid(theta, [n, 3, self.size, self.size], align_corners=False)
        return F.grid_sample(x, grid, mode="bilinear", padding_mode="border", align_corners=False)

    def color_jitter(self, x: torch.Tensor, apply: torch.Tensor, rand: _Rand) -> torch.Tensor:
        n = x.shape[0]
        s = self.strength

        def factor(spread: float, centre: float) -> torch.Tensor:
            f = centre - spread + 2 * spread * rand.u(n)
            return torch.where(apply, f, torch.full_like(f, centre))  # identity when not applied

        b = factor(0.8 * s, 1.0).clamp(min=0)
        c = factor(0.8 * s, 1.0).clamp(min=0)
        sat = factor(0.8 * s, 1.0).clamp(min=0)
        hue = factor(min(0.2 * s, 0.5), 0.0)
        order = torch.argsort(rand.u(n, 4), dim=1)  # a random order of the four ops per image
        factors = torch.stack([b, c, sat, torch.ones_like(b)], 1)  # op 3 (hue) blends nothing
        for k in range(4):
            op = order[:, k]
            # brightness, contrast and saturation are all blends x' = a*x + (1-a)*ref, with ref = 0 (black),
            # the image's mean grey level, or its grey image: one blend per pass, each image with its own op
            alpha = factors.gather(1, op[:, None]).view(n, 1, 1, 1)
            gray = _grayscale(x)
            ref = torch.where((op == 2).view(n, 1, 1, 1), gray, gray.mean(dim=(1, 2, 3), keepdim=True))
            ref = ref * (op != 0).view(n, 1, 1, 1)
            x = (alpha * x + (1 - alpha) * ref).clamp_(0, 1)
            sel = (op == 3) & (hue != 0)
            subset = x.device.type == "cpu" if self.hue_subset is None else self.hue_subset
            if subset:  # only the selected images: less work where compute is scarce
                idx = sel.nonzero()[:, 0]
                if idx.numel():
                    x = x.index_copy(0, idx, _shift_hue(x[idx], hue[idx]))
            else:  # the whole batch: no host sync (nonzero) and one kernel sequence
                x = torch.where(sel.view(n, 1, 1, 1), _shift_hue(x, hue), x)
        return x

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


@contextmanager
def cpu_threads(n: int) -> Iterator[None]:
    """Run the block with `n` intra-op threads (augmentation is many small ops: one thread avoids the
    OpenMP barriers that cost more than they save, badly so on a shared CPU)."""
    before = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(before)


class _Rand:
    """Uniform draws from one generator on one device."""

    def __init__(self, generator: torch.Generator, device: torch.device) -> None:
        self.g, self.device = generator, device

    def u(self, *shape: int) -> torch.Tensor:
        return torch.rand(*shape, generator=self.g, device=self.device)


def _grayscale(x: torch.Tensor) -> torch.Tensor:
    r, g, b = x.unbind(1)
    return (_GRAY[0] * r + _GRAY[1] * g + _GRAY[2] * b).unsqueeze(1)


def _shift_hue(x: torch.Tensor, shift: torch.Tensor) -> torch.Tensor:
    """Rotate the hue of each image [n, 3, H, W] in [0, 1] by `shift` [n] turns (HSV, as torchvision)."""
    r, g, b = x.unbind(1)
    maxc, _ = x.max(1)
    minc, _ = x.min(1)
    delta = maxc - minc
    sat = torch.where(maxc > 0, delta / maxc.clamp(min=1e-12), torch.zeros_like(maxc))
    d = torch.where(delta > 0, delta, torch.ones_like(delta))
    rc, gc, bc = (maxc - r) / d, (maxc - g) / d, (maxc - b) / d
    h = torch.where(maxc == r, bc - gc, torch.where(maxc == g, 2.0 + rc - bc, 4.0 + gc - rc))
    h = torch.where(delta > 0, (h / 6.0) % 1.0, torch.zeros_like(h))
    h = (h + shift.view(-1, 1, 1)) % 1.0
    v = maxc
    i = torch.floor(h * 6.0)
    f = h * 6.0 - i
    i = i.long() % 6
    p, q, t = v * (1 - sat), v * (1 - sat * f), v * (1 - sat * (1 - f))
    # (r, g, b) for each of the six hue sectors
    table = torch.stack(
        [torch.stack(c, 1) for c in ((v, t, p), (q, v, p), (p, v, t), (p, q, v), (t, p, v), (v, p, q))], 1
    )  # [n, 6, 3, H, W]
    return table.gather(1, i[:, None, None].expand(-1, 1, 3, -1, -1)).squeeze(1)
