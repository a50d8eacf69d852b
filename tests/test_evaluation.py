"""detrkit.evaluation against pycocotools, the reference implementation."""

import contextlib
import copy
import io
import json
import logging
import random

import pytest
import torch.distributed as dist
from pycocotools.coco import COCO as RefCOCO
from pycocotools.cocoeval import COCOeval as RefCOCOeval

from detrkit.errors import DetrkitError
from detrkit.evaluation import STAT_NAMES, CocoEvaluator, evaluate, evaluate_files, format_table

CATEGORIES = [{"id": 1, "name": "cat"}, {"id": 3, "name": "dog"}, {"id": 7, "name": "bird"}]


def make_gt(seed: int) -> dict:
    """Sparse image and category ids; small, medium and large boxes; a crowd box; an empty image."""
    rng = random.Random(seed)
    images = [{"id": i, "height": 480, "width": 640} for i in (2, 5, 11, 40, 97)]
    annotations = []
    for image in images[:-1]:  # the last image has no annotations
        for _ in range(rng.randint(3, 9)):
            side = rng.choice([rng.uniform(8, 28), rng.uniform(40, 90), rng.uniform(110, 300)])
            w, h = side * rng.uniform(0.7, 1.3), side * rng.uniform(0.7, 1.3)
            x, y = rng.uniform(0, 640 - w), rng.uniform(0, 480 - h)
            annotations.append({
                "id": len(annotations) + 1,
                "image_id": image["id"],
                "category_id": rng.choice([1, 3, 7]),
                "bbox": [x, y, w, h],
                # Segmentation area, smaller than the box: the area ranges must read this field.
                "area": w * h * rng.uniform(0.5, 1.0),
                "iscrowd": 0,
            })
    annotations.append({
        "id": len(annotations) + 1, "image_id": 5, "category_id": 3,
        "bbox": [300.0, 200.0, 200.0, 150.0], "area": 25000.0, "iscrowd": 1,
    })
    return {"images": images, "annotations": annotations, "categories": CATEGORIES}


def make_results(gt: dict, seed: int) -> list[dict]:
    """Jittered copies of the ground truth, wrong classes, misses and false positives."""
    rng = random.Random(seed)
    results = []
    for ann in gt["annotations"]:
        x, y, w, h = ann["bbox"]
        for _ in range(rng.choice([0, 1, 1, 2])):
            category = ann["category_id"] if rng.random() < 0.8 else rng.choice([1, 3, 7])
            box = [x + rng.gauss(0, 0.1 * w), y + rng.gauss(0, 0.1 * h),
                   w * rng.uniform(0.8, 1.2), h * rng.uniform(0.8, 1.2)]
            results.append({"image_id": ann["image_id"], "category_id": category, "bbox": box,
                            "score": rng.random()})
    for image in gt["images"]:
        for _ in range(rng.randint(0, 6)):
            w, h = rng.uniform(5, 200), rng.uniform(5, 200)
            results.append({"image_id": image["id"], "category_id": rng.choice([1, 3, 7]),
                            "bbox": [rng.uniform(0, 400), rng.uniform(0, 300), w, h], "score": rng.random()})
    # More than maxDets=100 in one image: the lowest-scoring ones must be dropped.
    for _ in range(110):
        results.append({"image_id": 11, "category_id": 1, "bbox": [rng.uniform(0, 600), rng.uniform(0, 400), 30, 30],
                        "score": rng.uniform(0, 0.3)})
    return results


def reference(gt: dict, results: list[dict], cat_ids: list[int] | None = None):
    """pycocotools' stats and what it printed."""
    with contextlib.redirect_stdout(io.StringIO()) as out:
        coco_gt = RefCOCO()
        coco_gt.dataset = copy.deepcopy(gt)
        coco_gt.createIndex()
        coco_eval = RefCOCOeval(coco_gt, coco_gt.loadRes(copy.deepcopy(results)), "bbox")
        if cat_ids is not None:
            coco_eval.params.catIds = cat_ids
        coco_eval.evaluate()
        coco_eval.accumulate()
        coco_eval.summarize()
    return [float(v) for v in coco_eval.stats], out.getvalue()


@pytest.mark.parametrize("seed", [0, 1, 2])
def test_matches_pycocotools(seed):
    gt = make_gt(seed)
    results = make_results(gt, seed + 100)
    expected, _ = reference(gt, results)
    stats = evaluate(gt, results)
    assert list(stats) == list(STAT_NAMES)
    assert [stats[n] for n in STAT_NAMES] == pytest.approx(expected, abs=1e-9)
    assert 0.1 < stats["AP"] < 0.9  # the data exercises the metric, not just its edges


def test_per_class_ap_matches_pycocotools_single_category():
    gt = make_gt(3)
    results = make_results(gt, 103)
    stats = evaluate(gt, results, per_class=True)
    for cat in CATEGORIES:
        expected, _ = reference(gt, results, cat_ids=[cat["id"]])
        assert stats[f"AP/{cat['name']}"] == pytest.approx(expected[0], abs=1e-9)


def test_annotation_id_zero_is_not_read_as_unmatched():
    gt = make_gt(4)
    results = [{"image_id": a["image_id"], "category_id": a["category_id"], "bbox": a["bbox"], "score": 0.9}
               for a in gt["annotations"]]
    expected, _ = reference(gt, results)
    zero_based = copy.deepcopy(gt)
    for ann in zero_based["annotations"]:
        ann["id"] -= 1
    assert [evaluate(zero_based, results)[n] for n in STAT_NAMES] == pytest.approx(expected, abs=1e-9)


def test_format_table_is_what_pycocotools_prints():
    gt = make_gt(5)
    results = make_results(gt, 105)
    _, printed = reference(gt, results)
    printed_rows = [line for line in printed.splitlines() if line.startswith(" Average")]
    assert format_table(evaluate(gt, results)).splitlines() == printed_rows


def test_format_table_lists_per_class_ap():
    table = format_table(evaluate(make_gt(5), make_results(make_gt(5), 105), per_class=True))
    assert len(table.splitlines()) == 12 + 1 + len(CATEGORIES)
    assert "dog" in table


def test_silent_and_inputs_untouched(capfd, caplog):
    caplog.set_level(logging.DEBUG)
    gt = make_gt(6)
    results = make_results(gt, 106)
    gt_before, results_before = copy.deepcopy(gt), copy.deepcopy(results)
    evaluate(gt, results)
    out, err = capfd.readouterr()
    assert out == "" and err == ""
    assert not [r for r in caplog.records if r.name.startswith("faster_coco_eval")]
    assert gt == gt_before and results == results_before


def test_empty_results_score_zero():
    assert evaluate(make_gt(7), []) == {name: 0.0 for name in STAT_NAMES}


def test_unknown_image_id_is_named():
    gt = make_gt(8)
    results = make_results(gt, 108) + [{"image_id": 12345, "category_id": 1, "bbox": [0, 0, 5, 5], "score": 0.5}]
    with pytest.raises(DetrkitError, match="12345"):
        evaluate(gt, results)


def test_unknown_category_id_is_named():
    results = [{"image_id": 2, "category_id": 0, "bbox": [0, 0, 5, 5], "score": 0.5}]
    with pytest.raises(DetrkitError, match="category_id 0"):
        evaluate(make_gt(8), results)


def test_evaluate_files(tmp_path):
    gt = make_gt(9)
    results = make_results(gt, 109)
    gt_path, results_path = tmp_path / "instances.json", tmp_path / "results.json"
    gt_path.write_text(json.dumps(gt))
    results_path.write_text(json.dumps(results))
    expected, _ = reference(gt, results)
    stats = evaluate_files(results_path, gt_path)
    assert [stats[n] for n in STAT_NAMES] == pytest.approx(expected, abs=1e-9)


@pytest.mark.parametrize(
    "results_text, annotations_text, bad_file, message",
    [
        ("[{broken", None, "results", "not valid JSON"),
        (None, "{broken", "instances", "not valid JSON"),
        ('{"image_id": 2}', None, "results", "expected a list"),
        (None, "[]", "instances", "expected a COCO dict"),
        (None, '{"images": [], "categories": []}', "instances", "'annotations'"),
    ],
)
def test_evaluate_files_errors_name_the_file(tmp_path, results_text, annotations_text, bad_file, message):
    gt = make_gt(10)
    paths = {"results": tmp_path / "results.json", "instances": tmp_path / "instances.json"}
    paths["results"].write_text(results_text or json.dumps(make_results(gt, 110)))
    paths["instances"].write_text(annotations_text or json.dumps(gt))
    with pytest.raises(DetrkitError, match=message) as info:
        evaluate_files(paths["results"], paths["instances"])
    assert str(paths[bad_file]) in str(info.value)


def test_evaluate_files_names_the_bad_entry(tmp_path):
    gt = make_gt(11)
    results = make_results(gt, 111)
    del results[3]["bbox"]
    gt_path, results_path = tmp_path / "instances.json", tmp_path / "results.json"
    gt_path.write_text(json.dumps(gt))
    results_path.write_text(json.dumps(results))
    with pytest.raises(DetrkitError, match=r"results\[3\] has no 'bbox'") as info:
        evaluate_files(results_path, gt_path)
    assert str(results_path) in str(info.value)
    with pytest.raises(DetrkitError, match="cannot read") as info:
        evaluate_files(results_path, tmp_path / "missing.json")
    assert "missing.json" in str(info.value)


def by_image(results: list[dict]) -> dict[int, list[dict]]:
    groups: dict[int, list[dict]] = {}
    for r in results:
        groups.setdefault(r["image_id"], []).append(r)
    return groups


def test_evaluator_accumulates_and_replaces_repeated_images():
    gt = make_gt(12)
    results = make_results(gt, 112)
    groups = by_image(results)
    evaluator = CocoEvaluator(gt)
    for image_id, dets in groups.items():
        evaluator.update(dets)
    evaluator.update(groups[5])  # a repeated image must not count twice
    assert len(evaluator.results) == len(results)
    assert evaluator.summarize() == evaluate(gt, results)


def test_evaluator_gathers_across_processes(monkeypatch):
    gt = make_gt(13)
    results = make_results(gt, 113)
    groups = by_image(results)
    ids = sorted(groups)
    rank0, rank1 = CocoEvaluator(gt), CocoEvaluator(gt)
    rank0.update([d for i in ids[::2] for d in groups[i]])
    # rank 1 also saw rank 0's first image again, as DistributedSampler padding does.
    rank1.update([d for i in ids[1::2] + ids[:1] for d in groups[i]])

    def all_gather_object(parts, obj):
        parts[:] = [obj, rank1._by_image]

    monkeypatch.setattr(dist, "is_initialized", lambda: True)
    monkeypatch.setattr(dist, "get_world_size", lambda: 2)
    monkeypatch.setattr(dist, "all_gather_object", all_gather_object)
    assert rank0.summarize() == evaluate(gt, results)
    assert len(rank0.results) < len(results)  # `results` stays this process's own

