"""Results as a COCO detection-results file, so a served model can be scored with COCOeval.

COCO results refer to images by the ids of a ground-truth file. With one
(`--annotations`), each image is matched to its entry by file name, and an
image the file does not know is refused up front rather than scored as a miss.
Without one, images get ids 1..N in sorted order, and a sidecar with those ids
and file names is written beside the results, so the numbers can be joined to
the images later (or the sidecar used as the skeleton of a ground-truth file).
"""

from __future__ import annotations

import json
from pathlib import Path, PurePosixPath
from typing import Iterable, Mapping, Sequence

from dd.client.api import Result


class CocoError(Exception):
    """An annotations file that cannot be used, with what to do about it."""


def result_to_coco(result: Result, image_id: int) -> list[dict]:
    """One COCO result entry per instance; class_id is kept as category_id (1-based, as in COCO)."""
    out = []
    for inst in result.instances:
        x1, y1, x2, y2 = inst.box
        entry: dict = {"image_id": image_id, "category_id": int(inst.class_id),
                       "bbox": [round(x1, 2), round(y1, 2), round(x2 - x1, 2), round(y2 - y1, 2)],
                       "score": round(float(inst.score), 5)}
        if inst.rle is not None:
            counts = inst.rle["counts"]
            entry["segmentation"] = {"size": [int(v) for v in inst.rle["size"]],
                                     "counts": counts.decode("ascii") if isinstance(counts, bytes) else counts}
        out.append(entry)
    return out


def _load(path: Path) -> dict:
    try:
        data = json.loads(Path(path).read_text())
    except OSError as exc:
        raise CocoError(f"cannot read annotations {path}: {exc.strerror or exc}") from exc
    except json.JSONDecodeError as exc:
        raise CocoError(f"annotations {path} is not valid JSON ({exc}); give a COCO instances file") from exc
    if not isinstance(data, dict) or not isinstance(data.get("images"), list):
        raise CocoError(f"annotations {path} has no \"images\" list; give a COCO instances file "
                        "(the one you evaluate against)")
    return data


def image_ids_from_annotations(path: Path, names: Sequence[str]) -> dict[str, int]:
    """Each of `names` (paths like "color/NAME.jpg", or "NAME.jpg") to its id in the annotations file.

    Matched on the whole relative path first, then on the file name, then on
    the stem (a PNG copy of a JPEG is still the same scene); a looser match is
    only taken when it is unambiguous.
    """
    data = _load(path)
    by_path: dict[str, int] = {}
    by_name: dict[str, list[int]] = {}
    by_stem: dict[str, list[int]] = {}
    for img in data["images"]:
        if "file_name" not in img or "id" not in img:
            raise CocoError(f"annotations {path}: an image entry lacks \"file_name\" or \"id\": {img}")
        p = PurePosixPath(str(img["file_name"]).replace("\\", "/"))
        by_path[str(p)] = int(img["id"])
        by_name.setdefault(p.name, []).append(int(img["id"]))
        by_stem.setdefault(p.stem, []).append(int(img["id"]))
    ids: dict[str, int] = {}
    missing: list[str] = []
    for name in names:
        p = PurePosixPath(name)
        if name in by_path:
            ids[name] = by_path[name]
        elif len(by_name.get(p.name, ())) == 1:
            ids[name] = by_name[p.name][0]
        elif len(by_stem.get(p.stem, ())) == 1:
            ids[name] = by_stem[p.stem][0]
        else:
            missing.append(name)
    if missing:
        shown = ", ".join(missing[:5]) + (f" and {len(missing) - 5} more" if len(missing) > 5 else "")
        raise CocoError(f"{len(missing)} of {len(names)} images are not in annotations {path} (matched by "
                        f"file_name): {shown}; give the annotations of these images, or leave out --annotations "
                        "to number them 1..N")
    return ids


def category_mismatches(path: Path, categories: Sequence[str]) -> list[str]:
    """Where the annotations' category ids name other classes than the model's 1-based class ids.

    Results carry the model's class ids; if the ground truth numbers its
    categories differently, COCOeval scores garbage without complaint.
    """
    data = _load(path)
    out = []
    for cat in data.get("categories", []) or []:
        try:
            cid, name = int(cat["id"]), str(cat["name"])
        except (KeyError, TypeError, ValueError):
            continue
        if 1 <= cid <= len(categories) and categories[cid - 1] != name:
            out.append(f"category {cid} is {name!r} in {path} but {categories[cid - 1]!r} in the model")
    return out


def sorted_image_ids(names: Iterable[str]) -> dict[str, int]:
    return {name: i + 1 for i, name in enumerate(sorted(names))}


def sidecar_path(results_path: Path) -> Path:
    """results.json -> results.images.json"""
    results_path = Path(results_path)
    return results_path.with_name(results_path.stem + ".images.json")


def write_results(path: Path, entries: list[dict], *, image_ids: Mapping[str, int] | None = None,
                  sizes: Mapping[str, tuple[int, int]] | None = None,
                  categories: Sequence[str] | None = None) -> Path | None:
    """Writes the results list; with `image_ids` (ids that no annotations file gave) also the sidecar.

    Returns the sidecar's path when one was written.
    """
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(entries, separators=(",", ":")))
    if image_ids is None:
        return None
    sizes = sizes or {}
    images = []
    for name, image_id in sorted(image_ids.items(), key=lambda kv: kv[1]):
        img: dict = {"id": image_id, "file_name": name}
        if name in sizes:
            img["height"], img["width"] = sizes[name]
        images.append(img)
    side = {"images": images, "categories": [{"id": i + 1, "name": n} for i, n in enumerate(categories or [])]}
    out = sidecar_path(path)
    out.write_text(json.dumps(side, indent=1))
    return out
