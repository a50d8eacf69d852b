"""Data pipeline: image reading, COCO loading and validation, transforms, batching, checks."""
from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from detrkit.config import DataConfig
from detrkit.data.batch import collate, pad_images
from detrkit.data.check import check_dataset, format_report
from detrkit.data.coco import CategoryMap, CocoDetection, load_annotations, resolve_split
from detrkit.data.image import read_image
from detrkit.data.transforms import (IMAGENET_MEAN, IMAGENET_STD, Compose, Normalize, RandomSizeCrop, ToTensor,
                                     crop, hflip, make_transforms, resize)
from detrkit.errors import DatasetError

# ---------------------------------------------------------------- helpers


def write_dataset(root: Path, images: dict[str, tuple[int, int]], annotations: list[dict],
                  categories: list[dict] | None = None) -> tuple[Path, Path]:
    """Write plain grey PNGs ({file_name: (w, h)}) with ids 1.. and an annotation file."""
    (root / "images").mkdir(parents=True, exist_ok=True)
    entries = []
    for i, (name, (w, h)) in enumerate(images.items()):
        Image.new("RGB", (w, h), (90, 90, 90)).save(root / "images" / name)
        entries.append({"id": i + 1, "file_name": name, "width": w, "height": h})
    if categories is None:
        categories = [{"id": 7, "name": "cat"}, {"id": 3, "name": "dog"}]
    data = {"images": entries, "annotations": annotations, "categories": categories}
    (root / "annotations.json").write_text(json.dumps(data))
    return root / "images", root / "annotations.json"


def ann(id: int, image_id: int, category_id: int, bbox: list, **extra) -> dict:
    return {"id": id, "image_id": image_id, "category_id": category_id, "bbox": bbox, **extra}


def small_cfg() -> DataConfig:
    return DataConfig(train_scales=[64, 80, 96, 112], val_scale=72, max_size=160,
                      crop_scales=[60, 80], crop_size=[40, 70])


def denormalise(image: torch.Tensor) -> torch.Tensor:
    return image * torch.tensor(IMAGENET_STD).view(3, 1, 1) + torch.tensor(IMAGENET_MEAN).view(3, 1, 1)


# ---------------------------------------------------------------- read_image


def test_read_grayscale(tmp_path):
    pixels = np.arange(12, dtype=np.uint8).reshape(3, 4) * 20
    Image.fromarray(pixels, mode="L").save(tmp_path / "g.png")
    img = read_image(tmp_path / "g.png")
    assert img.mode == "RGB" and img.size == (4, 3)
    np.testing.assert_array_equal(np.asarray(img), np.repeat(pixels[..., None], 3, axis=2))


def test_read_rgba_composites_on_black(tmp_path):
    rgba = np.array([[[200, 100, 50, 255], [200, 100, 50, 0], [200, 100, 50, 128]]], dtype=np.uint8)
    Image.fromarray(rgba, mode="RGBA").save(tmp_path / "a.png")
    out = np.asarray(read_image(tmp_path / "a.png")).astype(int)
    expected = np.rint(rgba[..., :3] * (rgba[..., 3:] / 255)).astype(int)
    assert np.abs(out - expected).max() <= 1


def test_read_16_bit_scales_instead_of_clipping(tmp_path):
    values = np.array([[0, 65535, 257 * 100, 32896]], dtype=np.uint16)
    Image.fromarray(values).save(tmp_path / "d.png")
    assert Image.open(tmp_path / "d.png").mode.startswith("I")
    out = np.asarray(read_image(tmp_path / "d.png"))
    np.testing.assert_array_equal(out[..., 0], [[0, 255, 100, 128]])
    np.testing.assert_array_equal(out[..., 0], out[..., 2])


def test_read_palette(tmp_path):
    palette = [10, 20, 30, 200, 0, 0, 0, 250, 5]
    index = np.array([[0, 1], [2, 1]], dtype=np.uint8)
    img = Image.fromarray(index, mode="P")
    img.putpalette(palette)
    img.save(tmp_path / "p.png")
    expected = np.array(palette, dtype=np.uint8).reshape(-1, 3)[index]
    np.testing.assert_array_equal(np.asarray(read_image(tmp_path / "p.png")), expected)


def test_read_applies_exif_orientation(tmp_path):
    # Four distinct quadrants, stored 40 wide x 20 high; orientation 6 = show rotated 90° clockwise.
    stored = np.zeros((20, 40, 3), dtype=np.uint8)
    stored[:10, :20] = (255, 0, 0)
    stored[:10, 20:] = (0, 255, 0)
    stored[10:, :20] = (0, 0, 255)
    stored[10:, 20:] = (255, 255, 255)
    exif = Image.Exif()
    exif[0x0112] = 6
    Image.fromarray(stored).save(tmp_path / "r.png", exif=exif)
    img = read_image(tmp_path / "r.png")
    assert img.size == (20, 40)
    np.testing.assert_array_equal(np.asarray(img), np.rot90(stored, k=-1))


@pytest.mark.parametrize("content", [None, b"not an image at all", "truncated"])
def test_read_bad_file_names_it(tmp_path, content):
    path = tmp_path / "bad.png"
    if content == "truncated":
        Image.new("RGB", (64, 64), (1, 2, 3)).save(path)
        path.write_bytes(path.read_bytes()[:60])
    elif content is not None:
        path.write_bytes(content)
    with pytest.raises(DatasetError, match="bad.png"):
        read_image(path)


# ---------------------------------------------------------------- dataset layout


def test_resolve_split_layouts(tmp_path):
    for split in ("train", "val"):
        write_dataset(tmp_path / "split" / split, {"a.png": (8, 8)}, [])
    assert resolve_split(tmp_path / "split", "val") == (tmp_path / "split/val/images",
                                                         tmp_path / "split/val/annotations.json")
    write_dataset(tmp_path / "flat", {"a.png": (8, 8)}, [])
    expected = (tmp_path / "flat/images", tmp_path / "flat/annotations.json")
    assert resolve_split(tmp_path / "flat", "train") == expected
    assert resolve_split(tmp_path / "flat") == expected
    assert resolve_split(tmp_path / "flat/images", annotations_file=tmp_path / "flat/annotations.json") == expected
    with pytest.raises(DatasetError, match="split.*'test'"):
        resolve_split(tmp_path / "split", "test")
    with pytest.raises(DatasetError, match="nope.json"):
        resolve_split(tmp_path / "flat/images", annotations_file=tmp_path / "nope.json")


# ---------------------------------------------------------------- categories


def test_category_map_sparse_ids_round_trip():
    cats = CategoryMap([11, 3, 7], ["zebra", "ant", "cat"])
    assert cats.ids == [3, 7, 11] and cats.names == ["ant", "cat", "zebra"]
    assert [cats.to_label(i) for i in (3, 7, 11)] == [0, 1, 2]
    assert [cats.to_id(label) for label in range(3)] == [3, 7, 11]
    restored = CategoryMap.from_dict(json.loads(json.dumps(cats.to_dict())))
    assert restored == cats and len(restored) == 3
    with pytest.raises(KeyError):
        cats.to_label(5)
    with pytest.raises(ValueError, match="duplicate"):
        CategoryMap([1, 1], ["a", "b"])


# ---------------------------------------------------------------- validation

VALID = {
    "images": [{"id": 1, "file_name": "a.png"}, {"id": 2, "file_name": "b.png"}],
    "annotations": [ann(10, 1, 7, [1, 1, 4, 4]), ann(11, 2, 3, [2, 2, 3, 3])],
    "categories": [{"id": 3, "name": "dog"}, {"id": 7, "name": "cat"}],
}


def _broken(edit) -> dict:
    data = json.loads(json.dumps(VALID))
    edit(data)
    return data


@pytest.mark.parametrize("edit, expected", [
    (lambda d: d.pop("categories"), "missing top-level key 'categories'"),
    (lambda d: d.update(images={}), "'images' must be a list"),
    (lambda d: d["images"][1].pop("file_name"), r"images\[1\] \(id 2\): missing key 'file_name'"),
    (lambda d: d["categories"][0].pop("name"), r"categories\[0\] \(id 3\): missing key 'name'"),
    (lambda d: d["annotations"][1].pop("bbox"), r"annotations\[1\] \(id 11\): missing key 'bbox'"),
    (lambda d: d["annotations"][1].update(bbox=[1, 2, "x"]),
     r"annotations\[1\] \(id 11\): bbox must be 4 finite numbers.*got \[1, 2, 'x'\]"),
    (lambda d: d["annotations"][0].update(bbox=[1, 2, 3, "4"]), r"annotations\[0\] \(id 10\): bbox"),
    (lambda d: d["annotations"][0].update(bbox=[1, 2, float("nan"), 4]), r"annotations\[0\] \(id 10\): bbox"),
    (lambda d: d["annotations"][0].update(bbox=[1, 2, float("inf"), 4]), r"annotations\[0\] \(id 10\): bbox"),
    (lambda d: d["annotations"][0].update(image_id=99), r"annotations\[0\] \(id 10\): image_id 99 is not in images"),
    (lambda d: d["annotations"][1].update(category_id=5),
     r"annotations\[1\] \(id 11\): category_id 5 is not in categories"),
    (lambda d: d["annotations"][1].update(id=10), r"annotations\[1\] \(id 10\): duplicate id 10"),
    (lambda d: d["images"][1].update(id=1), r"images\[1\] \(id 1\): duplicate id 1"),
    (lambda d: d["categories"][1].update(id=3), r"categories\[1\] \(id 3\): duplicate id 3"),
    (lambda d: d["images"][0].update(id="1"), r"images\[0\] \(id '1'\): id must be an integer"),
    (lambda d: d["annotations"][0].update(iscrowd=2), r"annotations\[0\] \(id 10\): iscrowd must be 0 or 1"),
    (lambda d: d["annotations"].append(7), r"annotations\[2\]: expected an object"),
    (lambda d: d["images"][1].update(file_name="gone.png"), r"images\[1\] \(id 2\): image file .*gone.png not found"),
])
def test_validation_errors_name_file_and_entry(tmp_path, edit, expected):
    images_dir, ann_file = write_dataset(tmp_path, {"a.png": (8, 8), "b.png": (8, 8)}, [])
    ann_file.write_text(json.dumps(_broken(edit)))
    with pytest.raises(DatasetError, match=expected) as err:
        load_annotations(ann_file, images_dir)
    assert str(ann_file) in str(err.value)


def test_unreadable_annotation_file(tmp_path):
    with pytest.raises(DatasetError, match="missing.json: annotation file not found"):
        load_annotations(tmp_path / "missing.json", tmp_path)
    (tmp_path / "broken.json").write_text('{"images": [')
    with pytest.raises(DatasetError, match="broken.json: cannot read"):
        load_annotations(tmp_path / "broken.json", tmp_path)


def test_valid_file_loads_and_fills_defaults(tmp_path):
    images_dir, ann_file = write_dataset(tmp_path, {"a.png": (8, 8), "b.png": (8, 8)}, [])
    ann_file.write_text(json.dumps(VALID))
    gt, stats = load_annotations(ann_file, images_dir)
    assert [a["area"] for a in gt["annotations"]] == [16, 9]
    assert [a["iscrowd"] for a in gt["annotations"]] == [0, 0]
    assert stats["dropped"]["non-positive width/height"] == 0


def test_degenerate_boxes_dropped_with_one_counted_warning(tmp_path):
    annotations = [ann(1, 1, 7, [1, 1, 0, 5]), ann(2, 1, 7, [1, 1, 5, -2]), ann(3, 1, 3, [1, 1, 5, 5]),
                   ann(4, 1, 3, [0, 0, 0, 0], iscrowd=1)]
    images_dir, ann_file = write_dataset(tmp_path, {"a.png": (16, 16)}, annotations)
    with pytest.warns(UserWarning, match="dropped 3 boxes with non-positive width/height") as record:
        dataset = CocoDetection(images_dir, ann_file)
    assert len(record) == 1 and str(ann_file) in str(record[0].message)
    assert [a["id"] for a in dataset.gt["annotations"]] == [3]
    assert dataset.stats["dropped"]["non-positive width/height"] == 3
    assert len(dataset[0][1]["boxes"]) == 1


# ---------------------------------------------------------------- CocoDetection


def test_targets_crowd_empty_clipping_and_labels(tmp_path):
    annotations = [
        ann(1, 1, 7, [2, 3, 10, 5]),
        ann(2, 1, 3, [30, 4, 20, 6]),  # sticks out on the right: clipped to x = 40
        ann(3, 1, 3, [5, 5, 8, 8], iscrowd=1),
        ann(4, 1, 7, [50, 50, 5, 5]),  # entirely outside the 40 x 30 image
        ann(5, 3, 3, [0, 0, 4, 4]),
    ]
    images_dir, ann_file = write_dataset(tmp_path, {"a.png": (40, 30), "b.png": (20, 10), "c.png": (12, 12)},
                                         annotations)
    dataset = CocoDetection(images_dir, ann_file)
    assert len(dataset) == 3 and dataset.image_ids == [1, 2, 3]
    assert dataset.categories.ids == [3, 7] and dataset.categories.names == ["dog", "cat"]
    assert any(a["iscrowd"] == 1 for a in dataset.gt["annotations"])  # kept for the evaluator

    image, target = dataset[0]
    assert image.size == (40, 30)
    torch.testing.assert_close(target["boxes"], torch.tensor([[2.0, 3, 12, 8], [30, 4, 40, 10]]))
    assert target["labels"].tolist() == [1, 0]  # id 7 -> label 1, id 3 -> label 0
    torch.testing.assert_close(target["area"], torch.tensor([50.0, 60.0]))
    assert int(target["image_id"]) == 1
    assert target["orig_size"].tolist() == target["size"].tolist() == [30, 40]

    _, empty = dataset[1]  # no annotations at all
    assert empty["boxes"].shape == (0, 4) and empty["labels"].shape == (0,) and empty["labels"].dtype == torch.int64

    image, target = CocoDetection(images_dir, ann_file, make_transforms(small_cfg(), train=False))[1]
    assert image.shape == (3, 72, 144) and target["boxes"].shape == (0, 4)


def test_val_pipeline_gives_normalised_cxcywh(tmp_path):
    images_dir, ann_file = write_dataset(tmp_path, {"a.png": (100, 50)}, [ann(1, 1, 3, [10, 20, 30, 10])])
    cfg = DataConfig(val_scale=100, max_size=150)
    image, target = CocoDetection(images_dir, ann_file, make_transforms(cfg, train=False))[0]
    # shorter side 50 -> 100 would make the longer 200 > 150, so the scale is 1.5: 150 x 75.
    assert image.shape == (3, 75, 150) and target["size"].tolist() == [75, 150]
    torch.testing.assert_close(target["boxes"], torch.tensor([[25 / 100, 25 / 50, 30 / 100, 10 / 50]]))
    torch.testing.assert_close(target["area"], torch.tensor([300 * 1.5**2]))
    assert target["orig_size"].tolist() == [50, 100]


def test_unreadable_image_fails_on_access(tmp_path):
    images_dir, ann_file = write_dataset(tmp_path, {"a.png": (8, 8)}, [])
    (images_dir / "a.png").write_bytes(b"garbage")
    dataset = CocoDetection(images_dir, ann_file)
    with pytest.raises(DatasetError, match="a.png"):
        dataset[0]


# ---------------------------------------------------------------- transforms


def _object_image(width=120, height=90, box=(30, 20, 70, 50)) -> tuple[Image.Image, dict]:
    pixels = np.full((height, width, 3), 40, dtype=np.uint8)
    x0, y0, x1, y1 = box
    pixels[y0:y1, x0:x1] = 220
    target = {"boxes": torch.tensor([box], dtype=torch.float32), "labels": torch.tensor([2]),
              "area": torch.tensor([float((x1 - x0) * (y1 - y0))]),
              "size": torch.tensor([height, width])}
    return Image.fromarray(pixels), target


def _extent(image: torch.Tensor) -> tuple[int, int, int, int] | None:
    """xyxy (exclusive) extent of the bright object in a (3, H, W) image in [0, 1], or None."""
    bright = image.mean(0) > (40 + 220) / 2 / 255
    if not bright.any():
        return None
    ys, xs = torch.nonzero(bright, as_tuple=True)
    return int(xs.min()), int(ys.min()), int(xs.max()) + 1, int(ys.max()) + 1


def test_train_transforms_keep_boxes_on_the_object():
    transforms = make_transforms(small_cfg(), train=True)
    sizes, centres = set(), []
    for seed in range(16):
        torch.manual_seed(seed)
        image, target = transforms(*_object_image())
        h, w = image.shape[1:]
        assert target["size"].tolist() == [h, w]
        sizes.add((h, w))
        extent = _extent(denormalise(image))
        if len(target["boxes"]) == 0:
            assert extent is None, f"seed {seed}: object visible but its box was dropped"
            continue
        cx, cy, bw, bh = (target["boxes"][0] * torch.tensor([w, h, w, h])).tolist()
        box = [cx - bw / 2, cy - bh / 2, cx + bw / 2, cy + bh / 2]
        torch.testing.assert_close(target["area"], torch.tensor([bw * bh]))
        if min(bw, bh) < 2:  # a sliver left by a crop may vanish in resampling
            continue
        assert extent is not None, f"seed {seed}: box {box} but no object"
        assert np.abs(np.subtract(box, extent)).max() <= 1.5, f"seed {seed}: box {box} vs pixels {extent}"
        centres.append(cx / w)
    assert len(sizes) > 3  # several scales and crops were exercised
    assert min(centres) < 0.5 < max(centres)  # the object (left of centre) was flipped at least once


def test_hflip_and_resize_exact():
    image, target = _object_image()
    flipped, t = hflip(image, target)
    assert t["boxes"].tolist() == [[50, 20, 90, 50]]
    assert _extent(ToTensor()(flipped, None)[0]) == (50, 20, 90, 50)
    resized, t = resize(image, target, size=45, max_size=None)  # 120 x 90 -> 60 x 45
    assert resized.size == (60, 45) and t["size"].tolist() == [45, 60]
    assert t["boxes"].tolist() == [[15, 10, 35, 25]] and t["area"].tolist() == [300]
    resized, _ = resize(image, None, size=90, max_size=100)  # longer side capped at 100
    assert resized.size == (100, 75)


def test_crop_clips_and_drops_boxes():
    image, _ = _object_image()
    target = {"boxes": torch.tensor([[30.0, 20, 70, 50], [0, 0, 10, 10], [60, 40, 100, 80]]),
              "labels": torch.tensor([0, 1, 2]), "area": torch.zeros(3), "size": torch.tensor([90, 120])}
    cropped, t = crop(image, target, top=15, left=25, height=30, width=40)
    assert cropped.size == (40, 30) and t["size"].tolist() == [30, 40]
    assert t["labels"].tolist() == [0, 2]  # the box at the origin falls outside
    assert t["boxes"].tolist() == [[5, 5, 40, 30], [35, 25, 40, 30]]
    assert t["area"].tolist() == [35 * 25, 5 * 5]


def test_random_size_crop_takes_a_window_of_the_image():
    # Pixel (x, y) holds (x, y, 7), so a crop's content tells where it was taken.
    x, y = np.meshgrid(np.arange(50), np.arange(30))
    image = Image.fromarray(np.stack([x, y, np.full_like(x, 7)], axis=-1).astype(np.uint8))
    target = {"boxes": torch.tensor([[10.0, 5, 20, 25]]), "labels": torch.tensor([1])}
    for seed in range(10):
        torch.manual_seed(seed)
        cropped, t = RandomSizeCrop(40, 45)(image, target)
        assert 40 <= cropped.width <= 45 and cropped.height == 30  # min side capped by the image
        assert t["size"].tolist() == [cropped.height, cropped.width]
        pixels = np.asarray(cropped).astype(int)
        left, top = pixels[0, 0, :2]
        np.testing.assert_array_equal(pixels[..., 0], left + np.arange(cropped.width)[None].repeat(30, 0))
        np.testing.assert_array_equal(pixels[..., 1], top + np.arange(30)[:, None].repeat(cropped.width, 1))
        expected = (torch.tensor([[10.0, 5, 20, 25]]) - torch.tensor([left, top, left, top])).clamp(min=0)
        torch.testing.assert_close(t["boxes"], expected)


def test_normalize():
    pixels = np.zeros((2, 4, 3), dtype=np.uint8)
    pixels[..., 0] = 255
    target = {"boxes": torch.tensor([[1.0, 0, 3, 2]])}
    image, t = Compose([ToTensor(), Normalize()])(Image.fromarray(pixels), target)
    assert image.shape == (3, 2, 4)
    torch.testing.assert_close(image[:, 0, 0], torch.tensor([(1 - 0.485) / 0.229, -0.456 / 0.224, -0.406 / 0.225]))
    torch.testing.assert_close(t["boxes"], torch.tensor([[0.5, 0.5, 0.5, 1.0]]))


# ---------------------------------------------------------------- batching


def test_pad_images_and_mask():
    a, b = torch.rand(3, 4, 5) + 1, torch.rand(3, 6, 2) + 1
    images, mask = pad_images([a, b])
    assert images.shape == (2, 3, 6, 5) and mask.shape == (2, 6, 5) and mask.dtype == torch.bool
    for k, img in enumerate((a, b)):
        h, w = img.shape[1:]
        torch.testing.assert_close(images[k, :, :h, :w], img)
        expected = torch.ones(6, 5, dtype=torch.bool)
        expected[:h, :w] = False
        assert torch.equal(mask[k], expected)
        assert torch.all(images[k][:, mask[k]] == 0)


def test_loader_over_synth(synth_root):
    images_dir, ann_file = resolve_split(synth_root, "train")
    dataset = CocoDetection(images_dir, ann_file, make_transforms(small_cfg(), train=True))
    loader = torch.utils.data.DataLoader(dataset, batch_size=4, collate_fn=collate)
    images, mask, targets = next(iter(loader))
    assert images.shape[0] == 4 and len(targets) == 4
    for k, t in enumerate(targets):
        h, w = t["size"].tolist()
        assert (~mask[k]).sum() == h * w and not mask[k, :h, :w].any()
        assert t["boxes"].shape[1] == 4 and torch.all((t["boxes"] >= 0) & (t["boxes"] <= 1))
        assert torch.all(t["labels"] < len(dataset.categories))


# ---------------------------------------------------------------- check


def test_check_report_counts(tmp_path):
    annotations = [
        ann(1, 1, 7, [0, 0, 10, 10]),  # small
        ann(2, 1, 7, [0, 0, 40, 40]),  # medium
        ann(3, 1, 3, [0, 0, 100, 100]),  # large
        ann(4, 2, 3, [1, 1, 0, 5]),  # dropped: zero width
        ann(5, 2, 3, [5, 5, 10, 10], iscrowd=1),  # crowd
        ann(6, 2, 7, [500, 500, 10, 10]),  # outside the image
    ]
    images_dir, ann_file = write_dataset(tmp_path, {"a.png": (120, 110), "b.png": (64, 48), "c.png": (80, 200)},
                                         annotations)
    report = check_dataset(images_dir, ann_file)
    assert report["images"] == 3 and report["empty_images"] == 2
    assert report["boxes"] == 3 and report["crowd"] == 1
    assert report["classes"] == [{"label": 0, "id": 3, "name": "dog", "boxes": 1},
                                 {"label": 1, "id": 7, "name": "cat", "boxes": 2}]
    assert report["sizes"] == {"small": 1, "medium": 1, "large": 1}
    assert report["dropped"] == {"non-positive width/height": 1, "outside the image": 1}
    assert report["width"] == [64, 120] and report["height"] == [48, 200]
    assert report["size_mismatch"] == 0
    text = format_report(report)
    for line in ("3 images (2 without boxes), 3 boxes, 1 crowd", "dropped 1 boxes: outside the image",
                 "1 small", "   1     7  cat  2", "width 64..120, height 48..200"):
        assert line in text


def test_check_synth_matches_independent_counts(synth_root):
    images_dir, ann_file = resolve_split(synth_root, "val")
    report = check_dataset(images_dir, ann_file)
    data = json.loads(ann_file.read_text())
    per_id = {c["id"]: 0 for c in data["categories"]}
    for a in data["annotations"]:
        per_id[a["category_id"]] += 1
    assert {c["id"]: c["boxes"] for c in report["classes"]} == per_id
    assert report["images"] == len(data["images"])
    with_boxes = {a["image_id"] for a in data["annotations"]}
    assert report["empty_images"] == sum(i["id"] not in with_boxes for i in data["images"])
    areas = [a["bbox"][2] * a["bbox"][3] for a in data["annotations"]]
    assert report["sizes"]["small"] == sum(a < 32**2 for a in areas)
    assert report["width"] == [min(i["width"] for i in data["images"]), max(i["width"] for i in data["images"])]


def test_check_reports_unreadable_images(tmp_path):
    images_dir, ann_file = write_dataset(tmp_path, {"a.png": (8, 8), "b.png": (8, 8), "c.png": (8, 8)}, [])
    (images_dir / "b.png").write_bytes(b"junk")
    (images_dir / "c.png").write_bytes(b"")
    with pytest.raises(DatasetError, match=r"b.png: cannot read image.*\(and 1 more"):
        check_dataset(images_dir, ann_file)
