"""BatchNorm statistics re-estimated on other photos (AdaBN), to test adapting a model to an unseen drive.

    python -m bench.adabn --checkpoint runs/B_preset_driveout/unet_model.pth \
        --photos Dataset/camvid_driveout/val --output /tmp/adabn_val.pth
    python inference.py --evaluate --checkpoint /tmp/adabn_val.pth --data_root Dataset/camvid_driveout

Every BatchNorm layer forgets its running statistics and averages them afresh (cumulatively, not by momentum)
over the --photos folder in batches, without labels; everything else in the weights file stays as it was.
"""
import argparse
from pathlib import Path

import torch

from dataset import image_files, read_image, to_model_input
from unet import load_weights, save_weights


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True, help="weights file of training.py")
    parser.add_argument("--photos", required=True, type=Path, help="folder of photos to take the statistics from")
    parser.add_argument("--output", required=True, type=Path, help="weights file to write")
    parser.add_argument("--batch_size", type=int, default=8, help="photos per forward pass (default: 8)")
    return parser.parse_args()


@torch.no_grad()
def reestimate_batchnorm(model, photos, batch_size):
    """Running statistics of every BatchNorm layer recomputed as the plain average over `photos` (model inputs)."""
    for layer in model.modules():
        if isinstance(layer, torch.nn.modules.batchnorm._BatchNorm):
            layer.reset_running_stats()
            layer.momentum = None  # a cumulative average
            layer.train()
    for start in range(0, len(photos), batch_size):
        model(torch.stack(photos[start:start + batch_size]))
    return model.eval()


def main():
    args = parse_args()
    if args.output.resolve() == Path(args.checkpoint).resolve():
        raise SystemExit(f"{args.output}: is --checkpoint itself; choose another --output")
    if not args.photos.is_dir() or not (paths := list(image_files(args.photos).values())):
        raise SystemExit(f"{args.photos}: no photos to take the statistics from")
    trained = load_weights(args.checkpoint)
    photos = [to_model_input(read_image(path), trained.image_size, trained.mean, trained.std) for path in paths]
    reestimate_batchnorm(trained.model, photos, args.batch_size)
    save_weights(args.output, trained.model, class_names=trained.class_names, class_colors=trained.class_colors,
                 image_size=trained.image_size, mean=trained.mean, std=trained.std, dataset=trained.dataset)
    print(f"BatchNorm statistics from {len(paths)} photos in {args.photos} -> {args.output}")


if __name__ == "__main__":
    main()
