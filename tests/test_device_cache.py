"""DeviceCache (batches.py): the split kept as uint8 tensors, augmented in batch; and training.py's
--data_cache device, whose runs must be as reproducible and resumable as the DataLoader path's."""
import numpy as np
import pytest
import torch
from torchvision.transforms.v2 import functional as F

import training
from batches import DeviceCache, jitter
from conftest import window_offset
from dataset import IGNORE_INDEX, MEAN, STD, SegmentationDataset, denormalize, paste

SIZE = (64, 32)


def CityscapesDataset(root, split, image_size):
    return SegmentationDataset(root, split, image_size, layout="cityscapes")
WIDTH, HEIGHT = SIZE


@pytest.fixture
def train_set(make_cityscapes):
    return CityscapesDataset(make_cityscapes(size=SIZE, block=8), "train", SIZE)


def interior(mask, margin=1):
    """Labelled pixels whose (2 * margin + 1)^2 neighbourhood holds one label: bilinear sampling blends
    colours only across region borders."""
    padded = np.pad(mask.astype(int), margin, constant_values=-1)
    windows = np.lib.stride_tricks.sliding_window_view(padded, (2 * margin + 1, 2 * margin + 1))
    return (windows == mask[..., None, None]).all(axis=(-1, -2)) & (mask != IGNORE_INDEX)


def test_unaugmented_batches_equal_the_dataset_items(make_cityscapes):
    root = make_cityscapes(size=(80, 40), counts={"train": 5, "val": 1})  # resized on the fly, like the loader
    dataset = CityscapesDataset(root, "train", SIZE)
    order = [3, 0, 3, 4]
    images, masks = DeviceCache(dataset).batch(order, [1, 2, 3, 4], augment=False)
    assert images.shape == (4, 3, HEIGHT, WIDTH) and images.dtype == torch.float32
    assert masks.shape == (4, HEIGHT, WIDTH) and masks.dtype == torch.int64
    for row, index in enumerate(order):
        image, mask = dataset[index]
        assert torch.equal(images[row], image)
        assert torch.equal(masks[row], mask)
    assert (masks == IGNORE_INDEX).any() and (masks < dataset.class_table.num_classes).any()


def test_augmented_image_and_mask_stay_aligned(make_cityscapes, label_id_colors):
    """Image colours encode label ids: after scale, crop and flip every labelled pixel away from a region
    border still shows its class colour, and most labelled pixels do: on these 16-pixel squares over 70% in
    each image, 80% on average (the DataLoader's antialiased pipeline blurs more: 70-90% on such data)."""
    train_set = CityscapesDataset(make_cityscapes(size=SIZE, block=16), "train", SIZE)
    cache = DeviceCache(train_set, scale_range=(0.5, 2.0), hflip_prob=0.5, color_jitter=0)
    class_colors = label_id_colors[train_set.class_table.label_ids].astype(int)
    plain_masks = cache.batch(range(4), range(4), augment=False)[1]
    images, masks = cache.batch([0, 1, 2, 3] * 4, range(16))
    checked, matching = 0, []
    for image, mask, plain in zip(images, masks, plain_masks.repeat(4, 1, 1)):
        assert not torch.equal(mask, plain)
        image, mask = denormalize(image).astype(int), mask.numpy()
        inside = interior(mask)
        assert np.abs(image[inside] - class_colors[mask[inside]]).max() <= 1
        labelled = mask != IGNORE_INDEX
        matching.append((np.abs(image[labelled] - class_colors[mask[labelled]]).max(axis=-1) <= 1).mean())
        checked += inside.sum()
    assert checked > 16 * WIDTH * HEIGHT // 4
    assert min(matching) > 0.7 and np.mean(matching) > 0.8


def test_scaling_down_pads_image_with_zero_and_mask_with_ignore(train_set):
    cache = DeviceCache(train_set, scale_range=(0.5, 0.5), hflip_prob=0, color_jitter=0)
    images, masks = cache.batch([0, 1, 2], [10, 11, 12])
    for image, mask in zip(images, masks):
        padding = (mask == IGNORE_INDEX).numpy()
        black = (denormalize(image) == 0).all(axis=-1)  # fixture colours are never black: only padding is
        # the half-size image lands at a sub-pixel offset, so up to one more row and column are blended
        outside = WIDTH * HEIGHT - (WIDTH // 2 + 1) * (HEIGHT // 2 + 1)
        assert outside <= black.sum() <= WIDTH * HEIGHT - (WIDTH // 2 - 1) * (HEIGHT // 2 - 1)
        assert padding.sum() >= outside
        assert padding[black].all()


@pytest.mark.parametrize("hflip_prob", [0.0, 1.0])
def test_flip_mirrors_the_batch_and_unit_scale_keeps_it(train_set, hflip_prob):
    cache = DeviceCache(train_set, scale_range=(1.0, 1.0), hflip_prob=hflip_prob, color_jitter=0)
    plain_images, plain_masks = cache.batch(range(4), range(4), augment=False)
    images, masks = cache.batch(range(4), [7, 8, 9, 10])
    if hflip_prob:
        plain_images, plain_masks = plain_images.flip(-1), plain_masks.flip(-1)
    assert torch.equal(masks, plain_masks)
    torch.testing.assert_close(images, plain_images, atol=1e-5, rtol=0)


def fixed_draws(cache, monkeypatch, scale_draw, x_draw, y_draw):
    """Every sample of the cache's batches gets these draws (no flip, no jitter)."""
    draws = torch.tensor([[scale_draw, x_draw, y_draw, 1.0, 0.5, 0.5, 0.5]], dtype=torch.float64)
    monkeypatch.setattr(cache, "draw_parameters", lambda seeds: draws.repeat(len(seeds), 1))


def test_crops_are_whole_pixel_windows_of_the_cached_image(make_cityscapes):
    dataset = SegmentationDataset(make_cityscapes(size=SIZE, block=8), "train", SIZE, layout="cityscapes")
    cache = DeviceCache(dataset, scale_range=(1.0, 1.0), hflip_prob=0, color_jitter=0, crop_size=(24, 16))
    plain_images, plain_masks = cache.batch(range(4), range(4), augment=False)
    images, masks = cache.batch([0, 1, 2, 3] * 4, range(16))
    assert images.shape == (16, 3, 16, 24) and masks.shape == (16, 16, 24)
    offsets = set()
    for image, mask, plain_image, plain_mask in zip(images, masks, plain_images.repeat(4, 1, 1, 1),
                                                    plain_masks.repeat(4, 1, 1)):
        x, y = window_offset(mask, plain_mask)  # as torchvision's RandomCrop: no blending at unit scale
        torch.testing.assert_close(image, plain_image[:, y:y + 16, x:x + 24], atol=1e-6, rtol=0)
        offsets.add((x, y))
    assert len(offsets) >= 8


@pytest.mark.parametrize("x_draw, y_draw, x, y", [(0.0, 0.0, 0, 0), (1 - 1e-9, 1 - 1e-9, 104, 48), (0.5, 0.25, 52, 12)])
def test_a_crop_of_the_doubled_image_starts_where_its_draws_say(train_set, monkeypatch, x_draw, y_draw, x, y):
    """At scale 2 the 64x32 image is 128x64: a 24x16 crop has 105 x 49 whole-pixel positions."""
    cache = DeviceCache(train_set, scale_range=(2.0, 2.0), hflip_prob=0.5, color_jitter=0, crop_size=(24, 16))
    fixed_draws(cache, monkeypatch, 0.0, x_draw, y_draw)
    plain = cache.batch([1], [0], augment=False)[1][0]
    doubled = plain.repeat_interleave(2, dim=0).repeat_interleave(2, dim=1)
    assert torch.equal(cache.batch([1], [0])[1][0], doubled[y:y + 16, x:x + 24])


@pytest.mark.parametrize("x_draw, image_columns", [(0.0, slice(64, 96)), (1 - 1e-9, slice(0, 32))])
def test_a_crop_larger_than_the_halved_image_pads_around_it_where_its_draws_say(train_set, monkeypatch, x_draw,
                                                                                image_columns):
    """At scale 0.5 the image is 32x16 inside a 96x48 crop; a draw of 0 puts all the padding before it."""
    cache = DeviceCache(train_set, scale_range=(0.5, 0.5), hflip_prob=0, color_jitter=0, crop_size=(96, 48))
    fixed_draws(cache, monkeypatch, 0.0, x_draw, 0.0)
    plain = cache.batch([1], [0], augment=False)[1][0]
    images, masks = cache.batch([1], [0])
    inside = torch.zeros(48, 96, dtype=torch.bool)
    inside[32:48, image_columns] = True
    assert torch.equal(masks[0][inside].view(16, 32), plain[::2, ::2])  # nearest: every other pixel
    assert (masks[0][~inside] == IGNORE_INDEX).all()
    assert (denormalize(images[0])[~inside.numpy()] == 0).all()


@pytest.mark.parametrize("crop_size", [(24, 16), (96, 48)])
def test_scaled_crops_keep_image_and_mask_aligned(make_cityscapes, label_id_colors, crop_size):
    """As test_augmented_image_and_mask_stay_aligned, for crops smaller and larger (padded) than the image."""
    dataset = SegmentationDataset(make_cityscapes(size=SIZE, block=16), "train", SIZE, layout="cityscapes")
    cache = DeviceCache(dataset, scale_range=(0.5, 2.0), hflip_prob=0.5, color_jitter=0, crop_size=crop_size)
    class_colors = label_id_colors[dataset.class_table.label_ids].astype(int)
    images, masks = cache.batch([0, 1, 2, 3] * 4, range(16))
    assert masks.shape == (16, crop_size[1], crop_size[0])
    checked = 0
    for image, mask in zip(images, masks):
        image, mask = denormalize(image).astype(int), mask.numpy()
        inside = interior(mask)
        assert (np.abs(image[inside] - class_colors[mask[inside]]) <= 1).all()
        checked += inside.sum()
    assert checked > 16 * min(crop_size[0] * crop_size[1], WIDTH * HEIGHT) // 4


def test_flips_follow_hflip_prob(train_set):
    cache = DeviceCache(train_set, scale_range=(1.0, 1.0), hflip_prob=0.5, color_jitter=0)
    plain = cache.batch([0], [0], augment=False)[1][0]
    masks = cache.batch([0] * 200, range(200))[1]
    flipped = sum(torch.equal(mask, plain.flip(-1)) for mask in masks)
    unflipped = sum(torch.equal(mask, plain) for mask in masks)
    assert flipped + unflipped == 200
    assert 70 <= flipped <= 130  # Binomial(200, 0.5): 100 +- 4.2 standard deviations


def test_copy_paste_in_the_cache_pastes_a_drawn_donor_per_sample(train_set):
    """As the dataset's copy-paste: each augmented sample is its photo with a train photo's (possibly mirrored)
    pixels of the pasted classes on top; about paste_prob of the samples are pasted; each sample's paste is
    a function of its own seed; paste_prob 0 leaves every batch as it was."""
    classes = tuple(range(1, 19, 2))
    plain_cache = DeviceCache(train_set, scale_range=(1.0, 1.0), hflip_prob=0, color_jitter=0)
    cache = DeviceCache(train_set, scale_range=(1.0, 1.0), hflip_prob=0, color_jitter=0, paste_prob=0.5,
                        paste_classes=classes)
    order, seeds = [0, 1, 2, 3] * 50, range(200)
    images, masks = cache.batch(order, seeds)
    pasted, donors_seen = 0, set()
    for row, index in enumerate(order):
        candidates = {(donor, mirrored): paste(cache.images[index], cache.masks[index], cache.images[donor],
                                               cache.masks[donor], torch.tensor(classes), mirrored)
                      for donor in range(len(cache)) for mirrored in (False, True)}
        matches = [key for key, (_, mask) in candidates.items() if torch.equal(masks[row], mask.long())]
        if not torch.equal(masks[row], cache.masks[index].long()):
            assert len(matches) >= 1, f"sample {row}: not a paste of any train photo"
            pasted += 1
            donors_seen.update(matches if len(matches) == 1 else [])
            expected = F.to_dtype(candidates[matches[0]][0], torch.float32, scale=True)
            torch.testing.assert_close(images[row], F.normalize(expected, MEAN, STD), atol=1e-5, rtol=0)
    # Binomial(200, 0.5) pasted (100 +- 7), less the ones that change nothing (a photo onto itself unmirrored: 1 in 8)
    assert 55 <= pasted <= 115
    assert len({donor for donor, _ in donors_seen}) == 4 and len({m for _, m in donors_seen}) == 2
    again = cache.batch([2, 0], [seeds[6], seeds[4]])
    assert torch.equal(again[1][0], masks[6]) and torch.equal(again[1][1], masks[4])
    off = DeviceCache(train_set, scale_range=(1.0, 1.0), hflip_prob=0, color_jitter=0, paste_prob=0.0,
                      paste_classes=classes)
    for batch_with, batch_without in zip(off.batch(order[:8], range(8)), plain_cache.batch(order[:8], range(8))):
        assert torch.equal(batch_with, batch_without)


def test_jitter_equals_torchvision_per_sample():
    images = torch.rand(3, 3, 8, 8, generator=torch.Generator().manual_seed(0))
    factors = torch.tensor([[0.8, 1.1, 1.2], [1.2, 0.7, 0.6], [1.0, 1.0, 1.0]])
    jittered = jitter(images, *factors.view(-1, 3, 1, 1, 1).unbind(1))
    for image, result, (brightness, contrast, saturation) in zip(images, jittered, factors.tolist()):
        expected = F.adjust_saturation(F.adjust_contrast(F.adjust_brightness(image, brightness), contrast), saturation)
        torch.testing.assert_close(result, expected)
    torch.testing.assert_close(jittered[2], images[2])


def test_color_jitter_changes_images_not_masks(train_set):
    cache = DeviceCache(train_set, scale_range=(1.0, 1.0), hflip_prob=0, color_jitter=0.4)
    plain_images, plain_masks = cache.batch(range(4), range(4), augment=False)
    images, masks = cache.batch(range(4), range(4))
    assert torch.equal(masks, plain_masks)
    assert all(not torch.allclose(image, plain, atol=1e-3) for image, plain in zip(images, plain_images))


def test_augmentation_is_a_pure_function_of_each_sample_seed(train_set):
    cache = DeviceCache(train_set)
    first = cache.batch([0, 1, 2, 3], [5, 6, 7, 2**64 - 1])
    again = cache.batch([0, 1, 2, 3], [5, 6, 7, 2**64 - 1])
    other = cache.batch([0, 1, 2, 3], [15, 16, 17, 18])
    alone = cache.batch([2], [7])  # neighbours in the batch do not matter
    assert torch.equal(first[0], again[0]) and torch.equal(first[1], again[1])
    assert all(not torch.equal(a, b) for a, b in zip(first[0], other[0]))
    assert torch.equal(alone[0][0], first[0][2]) and torch.equal(alone[1][0], first[1][2])


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_augmented_batches_on_cuda_do_not_sync(train_set):
    """--data_cache device exists to make the input pipeline free on a GPU: building an augmented batch
    there must never wait for the GPU (CUDA's sync debug mode makes any wait an error)."""
    cache = DeviceCache(train_set, "cuda", paste_prob=0.5, paste_classes=(1, 3))
    cache.batch([0, 1], [5, 6])  # warm-up: first kernels, pinned-memory pool
    torch.cuda.set_sync_debug_mode("error")
    try:
        images, masks = cache.batch([1, 0, 1], [7, 8, 9])
    finally:
        torch.cuda.set_sync_debug_mode("default")
    assert images.is_cuda and images.shape == (3, 3, HEIGHT, WIDTH) and masks.shape == (3, HEIGHT, WIDTH)


def test_unlabelled_split_cannot_be_cached(make_cityscapes):
    with pytest.raises(ValueError, match="'test' has no labels"):
        DeviceCache(CityscapesDataset(make_cityscapes(), "test", SIZE))


def train_weights(city, run_dir, *extra):
    training.main(["--data_root", str(city), "--out_dir", str(run_dir), "--model_path", str(run_dir / "model.pth"),
                   "--image_size", "32x16", "--base_channels", "4", "--depth", "2", "--batch_size", "2",
                   "--accum_steps", "1", "--warmup_steps", "1", "--num_workers", "0", "--device", "cpu",
                   "--data_cache", "device", "--dropout", "0.2", "--eval_interval", "100", *extra])
    return torch.load(run_dir / "checkpoint.pt", map_location="cpu", weights_only=True)


@pytest.mark.slow
@pytest.mark.parametrize("copy_paste", ["0", "0.5"])
def test_training_from_the_cache_reproduces_and_resumes_bit_exactly(make_cityscapes, tmp_path, one_thread, copy_paste):
    city = make_cityscapes(size=(32, 16), counts={"train": 5, "val": 2}, block=4, noise=10)
    paste = ("--copy_paste", copy_paste)
    reference = train_weights(city, tmp_path / "reference", "--training_iterations", "6", *paste)
    again = train_weights(city, tmp_path / "again", "--training_iterations", "6", *paste)
    train_weights(city, tmp_path / "resumed", "--training_iterations", "3", *paste)
    resumed = train_weights(city, tmp_path / "resumed", "--training_iterations", "6", "--resume", "auto")
    other_seed = train_weights(city, tmp_path / "other_seed", "--training_iterations", "6", "--seed", "1", *paste)
    assert reference["config"]["data_cache"] == "device" and resumed["step"] == 6
    assert reference["config"]["copy_paste"] == float(copy_paste) and (reference["config"]["paste_classes"] is None) \
        == (copy_paste == "0")
    for name, tensor in reference["model"].items():
        assert torch.equal(again["model"][name], tensor), name
        assert torch.equal(resumed["model"][name], tensor), name
    assert not torch.equal(other_seed["model"]["head.weight"], reference["model"]["head.weight"])


def test_resume_refuses_to_switch_the_data_pipeline(tmp_path, capsys):
    """The loader and the cache draw different augmentations from the same seeds: switching on resume
    would silently break the exact-resume promise, so it is an error."""
    root = tmp_path / "city"
    args = ["--dataset", "synthetic", "--data_root", str(root), "--synthetic_train", "4", "--synthetic_val", "2",
            "--image_size", "32x16", "--base_channels", "4", "--depth", "2", "--batch_size", "2",
            "--num_workers", "0", "--eval_interval", "2", "--save_model_interval", "2", "--device", "cpu",
            "--out_dir", str(tmp_path / "run"), "--model_path", str(tmp_path / "m.pth")]
    training.main([*args, "--training_iterations", "2"])
    capsys.readouterr()
    with pytest.raises(SystemExit) as exit_info:
        training.main(["--resume", str(tmp_path / "run" / "checkpoint.pt"), "--training_iterations", "4",
                       "--data_cache", "device"])
    assert exit_info.value.code == 2
    assert capsys.readouterr().err.strip().endswith(
        "was trained with --data_cache off; the two pipelines draw different augmentations, so the resume "
        "would not be exact")
