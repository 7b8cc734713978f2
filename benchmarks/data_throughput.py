"""Data throughput: decode + CIRKD train transform over real CamVid, ms per sample.

Compares the library pipeline (`build_dataset` -> `with_transform(SegmentationTransform)` ->
`create_dataloader`) with a minimal PIL + NumPy reference that does the same work the plain way
(open, scale, normalise the whole image, pad, crop, flip), at 0 and 2 workers, in the same run.

    python benchmarks/data_throughput.py [--root <camvid folder>] [--samples 160]

--root defaults to $FOTF_CAMVID_ROOT, else data/camvid.

Prints a Markdown table and one JSON line. Skips (exit 0) with a message if CamVid is absent.
"""

import argparse
import json
import os
import random
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch
from PIL import Image

REPO = Path(__file__).resolve().parents[1]
DEFAULT_ROOT = Path(os.environ.get("FOTF_CAMVID_ROOT") or REPO / "data" / "camvid")
MEAN = np.array([0.485, 0.456, 0.406], np.float32) * 255
STD = np.array([0.229, 0.224, 0.225], np.float32) * 255


class ReferenceDataset(torch.utils.data.Dataset):
    """The same operations written minimally with PIL + NumPy (Python `random` for the draws)."""

    def __init__(self, pairs, crop=(360, 360)):
        self.pairs, self.crop = pairs, crop

    def __len__(self):
        return len(self.pairs)

    def __getitem__(self, i):
        image_path, label_path = self.pairs[i]
        image = Image.open(image_path).convert("RGB")
        label = Image.open(label_path)
        f = 0.5 + random.randint(0, 15) / 10.0
        size = (round(image.width * f), round(image.height * f))
        image = np.asarray(image.resize(size, Image.BILINEAR), np.float32)
        label = np.asarray(label.resize(size, Image.NEAREST)).astype(np.int64)
        label[label == 11] = 255
        image = (image - MEAN) / STD
        ch, cw = self.crop
        ph, pw = max(ch - image.shape[0], 0), max(cw - image.shape[1], 0)
        image = np.pad(image, ((0, ph), (0, pw), (0, 0)))
        label = np.pad(label, ((0, ph), (0, pw)), constant_values=255)
        y = random.randint(0, image.shape[0] - ch)
        x = random.randint(0, image.shape[1] - cw)
        image, label = image[y:y + ch, x:x + cw], label[y:y + ch, x:x + cw]
        if random.random() < 0.5:
            image, label = image[:, ::-1], label[:, ::-1]
        return {"pixel_values": torch.from_numpy(np.ascontiguousarray(image.transpose(2, 0, 1))),
                "labels": torch.from_numpy(np.ascontiguousarray(label))}


def time_loader(loader, samples: int) -> float:
    """Seconds per sample to draw `samples` samples (worker start-up included)."""
    seen, start = 0, time.perf_counter()
    while seen < samples:
        for batch in loader:
            seen += batch["labels"].shape[0]
            if seen >= samples:
                break
    return (time.perf_counter() - start) / seen


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--root", default=str(DEFAULT_ROOT))
    parser.add_argument("--samples", type=int, default=160, help="samples drawn per measurement")
    parser.add_argument("--repeats", type=int, default=3, help="measurements per setting (median reported)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--crop", type=int, nargs=2, default=[360, 360])
    parser.add_argument("--workers", type=int, nargs="+", default=[0, 2])
    args = parser.parse_args(argv)
    root = Path(args.root)
    if not (root / "train.txt").is_file():
        print(f"skipped: CamVid not found at {root} (give --root or set FOTF_CAMVID_ROOT)")
        return 0
    torch.set_num_threads(1)

    from fotf_hf.data import SegmentationTransform, build_dataset, create_dataloader, defer_decoding

    start = time.perf_counter()
    dd, info = build_dataset("camvid", root=root)
    build_ms = 1000 * (time.perf_counter() - start)
    train = dd["train"]
    ours = train.with_transform(SegmentationTransform(train=True, crop_size=tuple(args.crop), num_labels=info.num_labels))
    pairs = [(r["image"]["path"], r["label"]["path"]) for r in defer_decoding(train)]
    reference = ReferenceDataset(pairs, tuple(args.crop))

    rows = []
    for workers in args.workers:
        times = {"fotf_hf": [], "reference": []}
        for _ in range(args.repeats):  # interleaved so that machine load hits both alike
            loader = create_dataloader(ours, batch_size=args.batch, train=True, num_workers=workers, seed=0)
            times["fotf_hf"].append(time_loader(loader, args.samples))
            loader = torch.utils.data.DataLoader(reference, batch_size=args.batch, shuffle=True, drop_last=True,
                                                 num_workers=workers)
            times["reference"].append(time_loader(loader, args.samples))
        ours_ms, ref_ms = (1000 * statistics.median(times[k]) for k in ("fotf_hf", "reference"))
        rows.append({"workers": workers, "fotf_hf_ms_per_sample": round(ours_ms, 2),
                     "reference_ms_per_sample": round(ref_ms, 2), "ratio": round(ours_ms / ref_ms, 3)})

    print(f"CamVid train, crop {args.crop[0]}x{args.crop[1]}, batch {args.batch}, {args.samples} samples x "
          f"{args.repeats} repeats (median), build_dataset {build_ms:.0f} ms")
    print("\n| workers | fotf_hf (ms/sample) | PIL+NumPy reference (ms/sample) | ratio |\n| --- | --- | --- | --- |")
    for r in rows:
        print(f"| {r['workers']} | {r['fotf_hf_ms_per_sample']} | {r['reference_ms_per_sample']} | {r['ratio']} |")
    print(json.dumps({"dataset": "camvid", "crop": args.crop, "batch": args.batch, "samples": args.samples,
                      "build_dataset_ms": round(build_ms, 1), "results": rows}))
    return 0


if __name__ == "__main__":
    sys.exit(main())
