"""Training batches: one seeded stream of images shared by every rank, each image augmented from its own
seed, on loader workers or from the device cache.

Data order and augmentation are pure functions of (seed, epoch, image), never of workers, ranks or the
global RNG, so a resumed run sees exactly the batches an uninterrupted one would, and N processes train
like one process with N times the accumulation.
"""
import atexit
import itertools
import multiprocessing
import multiprocessing.util  # registers multiprocessing's exit handler before ours, so ours runs first
import signal
import time

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler
from torchvision.transforms.v2 import functional as F

from dataset import IGNORE_INDEX, MEAN, STD, DatasetError, SegmentationDataset, check_augmentation, paste

PASTE_STREAM = 1  # derived_seed(sample seed, PASTE_STREAM) seeds a sample's copy-paste draws in the cache


def derived_seed(*keys):
    """A well-mixed 64-bit seed from integer keys, e.g. (seed, epoch, index)."""
    return int(np.random.SeedSequence(keys).generate_state(1, np.uint64)[0])


class GlobalBatchSampler(Sampler):
    """Endless stream of (index, sample seed), shuffled anew each epoch.

    Every optimizer step consumes batch_size * accum_steps * world_size items of one global stream, and
    rank r takes the r-th contiguous block, so its micro-batch j holds exactly the images a single process
    with accum_steps * world_size would put in micro-batch r * accum_steps + j (BatchNorm, whose statistics
    are per micro-batch, included). `start` is the global position to resume from.
    """

    def __init__(self, num_samples, seed, rank, world_size, rank_block, start=0):
        self.num_samples, self.seed, self.rank = num_samples, seed, rank
        self.world_size, self.rank_block, self.start = world_size, rank_block, start

    def __iter__(self):
        order_epoch, order = None, None
        position = self.start + self.rank * self.rank_block
        while True:
            for offset in range(self.rank_block):
                epoch, index = divmod(position + offset, self.num_samples)
                if epoch != order_epoch:
                    generator = torch.Generator().manual_seed(derived_seed(self.seed, epoch))
                    order_epoch, order = epoch, torch.randperm(self.num_samples, generator=generator).tolist()
                yield order[index], derived_seed(self.seed, epoch, order[index])
            position += self.rank_block * self.world_size


class SeededSamples(Dataset):
    """dataset[(index, seed)]: the sample drawn under its own torch seed, so random crops, flips and jitter
    depend on (seed, epoch, index) only; the global RNG is left untouched."""

    def __init__(self, dataset):
        self.dataset = dataset

    def __len__(self):
        return len(self.dataset)

    def __getitem__(self, key):
        index, seed = key
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            return self.dataset[index]


class DeviceCache:
    """A labelled split as uint8 tensors on one device, served as augmented batches made there: files are
    decoded once, and each batch is one gather, one affine_grid with two grid_samples and a few element-wise
    ops, so the input pipeline costs next to nothing beside the model.

    batch(indices, sample_seeds, augment) -> (normalised float32 (B,3,H,W), int64 class ids (B,H,W)), at
    crop_size (default: the dataset's image_size) when augmented. Without augmentation the items equal the
    dataset's own. With it, each sample's parameters come from its own seed (augmentation stays a pure
    function of (seed, epoch, index)), drawn from the same distributions as build_transform's, not the same
    pixels: downscaling without antialiasing, and jitter's three factors in a fixed order on float pixels.
    Copy-paste (paste_prob, paste_classes) comes first, as in the dataset.
    """

    def __init__(self, dataset: SegmentationDataset, device="cpu", scale_range=(0.5, 2.0), hflip_prob=0.5,
                 color_jitter=0.2, num_workers=0, crop_size=None, paste_prob=0.0, paste_classes=()):
        if not dataset.has_labels:
            raise DatasetError(f"split {dataset.split!r} has no labels, so it cannot be cached for training")
        check_augmentation(scale_range, paste_prob)
        self.device = torch.device(device)
        self.scale_range, self.hflip_prob, self.color_jitter = tuple(scale_range), hflip_prob, color_jitter
        self.paste_prob = paste_prob if paste_classes else 0.0
        self.paste_classes = torch.tensor(paste_classes, dtype=torch.uint8, device=self.device)
        width, height = dataset.image_size
        self.crop_size = tuple(crop_size or dataset.image_size)
        self.images = torch.empty(len(dataset), 3, height, width, dtype=torch.uint8, device=self.device)
        self.masks = torch.empty(len(dataset), height, width, dtype=torch.uint8, device=self.device)
        # batch_size=None hands each index to collate_fn alone, so the workers decode one sample each
        samples = torch.utils.data.DataLoader(range(len(dataset)), batch_size=None, num_workers=num_workers,
                                              collate_fn=dataset.read_sample)
        for index, (image, mask) in enumerate(samples):
            self.images[index] = image
            self.masks[index] = mask

    def __len__(self):
        return len(self.images)

    def to_device(self, tensor) -> torch.Tensor:
        """A small CPU tensor to the cache's device without waiting for the GPU: a copy from pageable
        memory would synchronise with the stream, so on CUDA it goes through pinned memory."""
        if self.device.type == "cuda":
            tensor = tensor.pin_memory()
        return tensor.to(self.device, non_blocking=True)

    def batch(self, indices, sample_seeds, augment=True) -> tuple[torch.Tensor, torch.Tensor]:
        rows = self.to_device(torch.as_tensor(list(indices)))
        images, masks = self.images[rows], self.masks[rows]
        if augment and self.paste_prob:
            images, masks = self.copy_paste(images, masks, sample_seeds)
        images = F.to_dtype(images, torch.float32, scale=True)
        if augment:
            images, masks = self.augment(images, masks, sample_seeds)
        return F.normalize(images, MEAN, STD), masks.long()

    def copy_paste(self, images, masks, sample_seeds):
        """dataset.paste on the samples whose own seed says so, from the donor (and mirroring) it draws."""
        generators = [torch.Generator().manual_seed(derived_seed(int(seed), PASTE_STREAM)) for seed in sample_seeds]
        draws = torch.stack([torch.rand(3, generator=generator, dtype=torch.float64) for generator in generators])
        chosen = self.to_device(draws[:, 0] < self.paste_prob)
        donors = self.to_device((draws[:, 1] * len(self)).long().clamp(max=len(self) - 1))
        pasted_images, pasted_masks = paste(images, masks, self.images[donors], self.masks[donors],
                                            self.paste_classes, self.to_device(draws[:, 2] < 0.5))
        return (torch.where(chosen[:, None, None, None], pasted_images, images),
                torch.where(chosen[:, None, None], pasted_masks, masks))

    def draw_parameters(self, sample_seeds) -> torch.Tensor:
        """(B, 7) float64 on the CPU: per sample, uniform draws for scale, crop x, crop y, flip, brightness,
        contrast and saturation from a generator seeded by that sample's seed alone."""
        return torch.stack([torch.rand(7, generator=torch.Generator().manual_seed(int(seed)), dtype=torch.float64)
                            for seed in sample_seeds])

    def augment(self, images, masks, sample_seeds):
        """Scale, crop and flip as one sampling grid per sample (output pixel -> source pixel, in
        grid_sample's normalised coordinates), then colour jitter; float images in [0, 1], uint8 masks,
        both at the crop size."""
        draws = self.draw_parameters(sample_seeds)
        low, high = self.scale_range
        scale = low + (high - low) * draws[:, 0]
        (height, width), (crop_width, crop_height) = images.shape[-2:], self.crop_size
        crop_fraction_x, crop_fraction_y = crop_width / width, crop_height / height
        crop_x = self.crop_offset(scale - crop_fraction_x, draws[:, 1], width)
        crop_y = self.crop_offset(scale - crop_fraction_y, draws[:, 2], height)
        mirror = torch.where(draws[:, 3] < self.hflip_prob, -1.0, 1.0)
        theta = torch.zeros(len(scale), 2, 3, dtype=torch.float64)
        theta[:, 0, 0] = mirror * crop_fraction_x / scale
        theta[:, 0, 2] = (crop_fraction_x + 2 * crop_x) / scale - 1
        theta[:, 1, 1] = crop_fraction_y / scale
        theta[:, 1, 2] = (crop_fraction_y + 2 * crop_y) / scale - 1
        theta = self.to_device(theta.float())
        output_shape = [len(images), images.shape[1], crop_height, crop_width]
        grid = torch.nn.functional.affine_grid(theta, output_shape, align_corners=False)
        images = torch.nn.functional.grid_sample(images, grid, mode="bilinear", padding_mode="zeros",
                                                 align_corners=False)
        # labels shifted by one so that zero padding marks pixels outside the scaled image
        shifted = torch.nn.functional.grid_sample(masks[:, None].float() + 1, grid, mode="nearest",
                                                  padding_mode="zeros", align_corners=False)[:, 0]
        masks = torch.where(shifted == 0, IGNORE_INDEX, shifted - 1).to(torch.uint8)
        if self.color_jitter > 0:
            factors = (1 + self.color_jitter * (2 * draws[:, 4:] - 1)).clamp(min=0).view(-1, 3, 1, 1, 1)
            images = jitter(images, *self.to_device(factors.float()).unbind(1))
        return images, masks

    @staticmethod
    def crop_offset(shift, draw, size) -> torch.Tensor:
        """The crop window's first pixel in the scaled image, in whole pixels as torchvision's RandomCrop
        draws it, as a fraction of the cached size: inside the scaled image when it is larger than the crop
        (shift > 0), a negative offset (padding before it) when it is smaller."""
        positions = (shift.abs() * size).floor()  # whole-pixel offsets that keep the window inside
        offset = (draw * (positions + 1)).floor().clamp(max=positions)
        return torch.where(shift < 0, offset - positions, offset) / size


def jitter(images, brightness, contrast, saturation) -> torch.Tensor:
    """ColorJitter's brightness, contrast and saturation blends on float images (B,3,H,W) in [0, 1], with
    per-sample factors (B,1,1,1)."""
    images = (images * brightness).clamp(0, 1)
    mean = F.rgb_to_grayscale(images).mean(dim=(-3, -2, -1), keepdim=True)
    images = (contrast * images + (1 - contrast) * mean).clamp(0, 1)
    return (saturation * images + (1 - saturation) * F.rgb_to_grayscale(images)).clamp(0, 1)


class CachedBatches:
    """The train loader's stand-in under --data_cache device: the same (index, seed) stream, batched from the
    cache."""

    def __init__(self, cache, sampler, batch_size):
        self.dataset, self.sampler, self.batch_size = cache, sampler, batch_size

    def __iter__(self):
        keys = iter(self.sampler)
        while True:
            indices, seeds = zip(*itertools.islice(keys, self.batch_size))
            yield self.dataset.batch(indices, seeds)


class TimedBatches:
    """The training batches, adding up how long the loop waits for them (`waited`, seconds): as a share of
    the wall time it says whether the input pipeline, not the model, sets the pace."""

    def __init__(self, batches):
        self.batches, self.waited = iter(batches), 0.0

    def __iter__(self):
        return self

    def __next__(self):
        start = time.perf_counter()
        batch = next(self.batches)
        self.waited += time.perf_counter() - start
        return batch


def ignore_stop_signals(worker_id):
    """Workers ignore Ctrl-C and SIGTERM (which `timeout` and SLURM send to every process of the job): the main
    process decides when to stop and must still get its batches."""
    for stop_signal in (signal.SIGINT, signal.SIGTERM):
        signal.signal(stop_signal, signal.SIG_IGN)


def kill_loader_workers():
    """At exit, kill the DataLoader workers still alive (a loader kept by an uncaught error's traceback, say):
    they ignore SIGTERM, so multiprocessing's own exit handler, which sends daemonic children SIGTERM and then
    joins them, would wait for them forever. The loaders' SIGCHLD handler would report each kill as an error."""
    signal.signal(signal.SIGCHLD, signal.SIG_DFL)
    for child in multiprocessing.active_children():
        if child.daemon:
            child.kill()


atexit.register(kill_loader_workers)  # atexit runs handlers last-registered first


def loader_options(num_workers, device, seed):
    """DataLoader settings for training and validation: persistent prefetching workers, pinned memory on
    CUDA, and a generator of their own (creating an iterator must not draw from the global RNG)."""
    return dict(num_workers=num_workers, pin_memory=device.type == "cuda", persistent_workers=num_workers > 0,
                prefetch_factor=4 if num_workers else None, worker_init_fn=ignore_stop_signals,
                generator=torch.Generator().manual_seed(seed))


def train_batches(train_set, config, rank, world_size, device, samples_seen):
    """This rank's endless stream of (images, masks) micro-batches, from the samples_seen-th image of the global
    stream on, from DataLoader workers or, with config.data_cache == "device", from a DeviceCache."""
    rank_block = config.batch_size * config.accum_steps
    sampler = GlobalBatchSampler(len(train_set), config.seed, rank, world_size, rank_block, start=samples_seen)
    if config.data_cache == "off":
        return DataLoader(SeededSamples(train_set), sampler=sampler, batch_size=config.batch_size,
                          **loader_options(config.num_workers, device, config.seed))
    width, height = train_set.image_size
    cache_bytes = len(train_set) * width * height * 4  # uint8 RGB image + uint8 mask per pixel
    if device.type == "cuda" and cache_bytes > torch.cuda.mem_get_info(device)[0] // 2:
        raise DatasetError(f"--data_cache device: the train split needs {cache_bytes / 2**30:.1f} GiB, more than half "
                           f"of the {torch.cuda.mem_get_info(device)[0] / 2**30:.1f} GiB free on {device}")
    if rank == 0:
        print(f"caching {len(train_set)} train images ({cache_bytes / 2**30:.2f} GiB) on {device}")
    cache = DeviceCache(train_set, device, tuple(config.scale_range), config.hflip_prob, config.color_jitter,
                        num_workers=config.num_workers, crop_size=train_set.crop_size, paste_prob=train_set.paste_prob,
                        paste_classes=train_set.paste_classes.tolist())
    return CachedBatches(cache, sampler, config.batch_size)
