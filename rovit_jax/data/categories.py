"""Category tables: ordered (id, name, frequency) records, base / novel splits, OV-COCO constants.

Every detection reader exposes its vocabulary as a `CategoryTable`. Frequencies follow LVIS:
"f" (frequent), "c" (common), "r" (rare), or "" when the dataset has none (COCO, Objects365).
The open-vocabulary protocol holds a set of frequency groups out of detection training (novel)
and evaluates on all categories; `base_ids` / `novel_ids` give the two sides, and
`frequency_groups` feeds `detection_example.base_category_map`.

The table also reads the shapes world's metadata (`builder.info.metadata["categories"]`, a list
of {"id", "name", "frequency"}) with `from_records`, and gives the (id, name, frequency) tuples
the detection task uses with `as_tuples`.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Iterator, Mapping, Sequence
from typing import Any

FREQUENCIES = ("f", "c", "r")

# COCO 2017 detection categories (instances_*2017.json), in id order: 80 of the ids 1..90.
COCO_CATEGORIES: tuple[tuple[int, str], ...] = (
    (1, "person"),
    (2, "bicycle"),
    (3, "car"),
    (4, "motorcycle"),
    (5, "airplane"),
    (6, "bus"),
    (7, "train"),
    (8, "truck"),
    (9, "boat"),
    (10, "traffic light"),
    (11, "fire hydrant"),
    (13, "stop sign"),
    (14, "parking meter"),
    (15, "bench"),
    (16, "bird"),
    (17, "cat"),
    (18, "dog"),
    (19, "horse"),
    (20, "sheep"),
    (21, "cow"),
    (22, "elephant"),
    (23, "bear"),
    (24, "zebra"),
    (25, "giraffe"),
    (27, "backpack"),
    (28, "umbrella"),
    (31, "handbag"),
    (32, "tie"),
    (33, "suitcase"),
    (34, "frisbee"),
    (35, "skis"),
    (36, "snowboard"),
    (37, "sports ball"),
    (38, "kite"),
    (39, "baseball bat"),
    (40, "baseball glove"),
    (41, "skateboard"),
    (42, "surfboard"),
    (43, "tennis racket"),
    (44, "bottle"),
    (46, "wine glass"),
    (47, "cup"),
    (48, "fork"),
    (49, "knife"),
    (50, "spoon"),
    (51, "bowl"),
    (52, "banana"),
    (53, "apple"),
    (54, "sandwich"),
    (55, "orange"),
    (56, "broccoli"),
    (57, "carrot"),
    (58, "hot dog"),
    (59, "pizza"),
    (60, "donut"),
    (61, "cake"),
    (62, "chair"),
    (63, "couch"),
    (64, "potted plant"),
    (65, "bed"),
    (67, "dining table"),
    (70, "toilet"),
    (72, "tv"),
    (73, "laptop"),
    (74, "mouse"),
    (75, "remote"),
    (76, "keyboard"),
    (77, "cell phone"),
    (78, "microwave"),
    (79, "oven"),
    (80, "toaster"),
    (81, "sink"),
    (82, "refrigerator"),
    (84, "book"),
    (85, "clock"),
    (86, "vase"),
    (87, "scissors"),
    (88, "teddy bear"),
    (89, "hair drier"),
    (90, "toothbrush"),
)

# Open-vocabulary COCO (Bansal et al. 2018, as used by OVR-CNN, ViLD and RO-ViT): 48 base
# categories train the detector, 17 novel ones are evaluated only; the other 15 COCO
# categories are in neither (they lack a WordNet synset in the original split).
OV_COCO_BASE: tuple[str, ...] = (
    "person",
    "bicycle",
    "car",
    "motorcycle",
    "train",
    "truck",
    "boat",
    "bench",
    "bird",
    "horse",
    "sheep",
    "bear",
    "zebra",
    "giraffe",
    "backpack",
    "handbag",
    "suitcase",
    "frisbee",
    "skis",
    "kite",
    "surfboard",
    "bottle",
    "fork",
    "spoon",
    "bowl",
    "banana",
    "apple",
    "sandwich",
    "orange",
    "broccoli",
    "carrot",
    "pizza",
    "donut",
    "chair",
    "bed",
    "toilet",
    "tv",
    "laptop",
    "mouse",
    "remote",
    "microwave",
    "oven",
    "toaster",
    "refrigerator",
    "book",
    "clock",
    "vase",
    "toothbrush",
)
OV_COCO_NOVEL: tuple[str, ...] = (
    "airplane",
    "bus",
    "cat",
    "dog",
    "cow",
    "elephant",
    "umbrella",
    "tie",
    "snowboard",
    "skateboard",
    "cup",
    "knife",
    "cake",
    "couch",
    "keyboard",
    "sink",
    "scissors",
)


@dataclasses.dataclass(frozen=True)
class Category:
    """One category: dataset id, name, and frequency group ("f" / "c" / "r", or "" if unknown)."""

    id: int
    name: str
    frequency: str = ""


@dataclasses.dataclass(frozen=True)
class CategoryTable:
    """An ordered, id-unique list of categories.

    The order is the vocabulary order (the detection task numbers training classes in it).
    Categories with an unknown frequency ("") are never novel.
    """

    categories: tuple[Category, ...]

    def __post_init__(self):
        cats = tuple(self.categories)
        object.__setattr__(self, "categories", cats)
        seen: set[int] = set()
        for c in cats:
            if not isinstance(c, Category):
                raise TypeError(f"categories must be Category records, got {type(c).__name__}")
            if isinstance(c.id, bool) or not isinstance(c.id, int):
                raise ValueError(f"category id must be an int, got {c.id!r} ({c.name!r})")
            if c.id in seen:
                raise ValueError(f"category id {c.id} appears more than once")
            if c.frequency not in FREQUENCIES + ("",):
                raise ValueError(
                    f"category {c.id} ({c.name!r}) has frequency {c.frequency!r}; expected one "
                    f"of {FREQUENCIES} or ''"
                )
            seen.add(c.id)

    # ---- construction -------------------------------------------------------------------------
    @classmethod
    def from_records(cls, records: Iterable[Mapping[str, Any]]) -> CategoryTable:
        """From dicts with "id", "name" and optionally "frequency" (kept in the given order)."""
        cats = []
        for i, r in enumerate(records):
            for key in ("id", "name"):
                if key not in r:
                    raise ValueError(f"category record {i} has no {key!r} key: {dict(r)!r}")
            cats.append(Category(int(r["id"]), str(r["name"]), str(r.get("frequency") or "")))
        return cls(tuple(cats))

    @classmethod
    def from_coco_json(cls, data: Mapping[str, Any]) -> CategoryTable:
        """From a loaded COCO / LVIS / Objects365 annotation dict, ordered by category id.

        LVIS's "frequency" field is kept; datasets without it get "".
        """
        if "categories" not in data:
            raise ValueError(f"annotation JSON has no 'categories' key (keys: {sorted(data)})")
        return cls.from_records(sorted(data["categories"], key=lambda c: int(c["id"])))

    # ---- access --------------------------------------------------------------------------------
    def __len__(self) -> int:
        return len(self.categories)

    def __iter__(self) -> Iterator[Category]:
        return iter(self.categories)

    def __contains__(self, category_id: object) -> bool:
        return any(c.id == category_id for c in self.categories)

    def ids(self) -> list[int]:
        return [c.id for c in self.categories]

    def names(self) -> list[str]:
        return [c.name for c in self.categories]

    def by_id(self) -> dict[int, Category]:
        return {c.id: c for c in self.categories}

    def name_of(self, category_id: int) -> str:
        """The name of `category_id`; KeyError naming the id if it is not in the table."""
        for c in self.categories:
            if c.id == category_id:
                return c.name
        raise KeyError(f"category id {category_id} is not in the table")

    def base_ids(self, novel_frequencies: Sequence[str] = ("r",)) -> list[int]:
        """Ids whose frequency is NOT in `novel_frequencies` (LVIS default: f + c, and unknown)."""
        novel = _check_frequencies(novel_frequencies)
        return [c.id for c in self.categories if c.frequency not in novel]

    def novel_ids(self, novel_frequencies: Sequence[str] = ("r",)) -> list[int]:
        """Ids whose frequency is in `novel_frequencies` (LVIS default: rare)."""
        novel = _check_frequencies(novel_frequencies)
        return [c.id for c in self.categories if c.frequency in novel]

    def frequency_groups(self) -> dict[str, list[int]]:
        """{"f": ids, "c": ids, "r": ids} (plus "" for categories of unknown frequency, if any)."""
        groups: dict[str, list[int]] = {f: [] for f in FREQUENCIES}
        for c in self.categories:
            groups.setdefault(c.frequency, []).append(c.id)
        return groups

    def as_tuples(self) -> list[tuple[int, str, str]]:
        """[(id, name, frequency)], the table format of the detection task."""
        return [(c.id, c.name, c.frequency) for c in self.categories]

    def restrict(self, ids: Iterable[int]) -> CategoryTable:
        """The categories whose id is in `ids`, in this table's order; ValueError on unknown ids."""
        keep = {int(i) for i in ids}
        unknown = keep - set(self.ids())
        if unknown:
            raise ValueError(f"category ids {sorted(unknown)} are not in the table")
        return CategoryTable(tuple(c for c in self.categories if c.id in keep))


def _check_frequencies(frequencies: Sequence[str]) -> set[str]:
    if isinstance(frequencies, str):  # "rc" would silently mean {"r", "c"}
        raise TypeError(f"pass frequencies as a sequence such as ('r',), got {frequencies!r}")
    bad = [f for f in frequencies if f not in FREQUENCIES]
    if bad:
        raise ValueError(f"unknown frequency groups {bad}; expected a subset of {FREQUENCIES}")
    return set(frequencies)


def coco_category_table() -> CategoryTable:
    """The 80 COCO 2017 categories (official ids 1..90 with gaps), frequency unknown."""
    return CategoryTable(tuple(Category(i, n) for i, n in COCO_CATEGORIES))
