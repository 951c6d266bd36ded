"""The shapes world as a tensorflow-datasets dataset (`shapes_world`), built locally from a seed.

Stored as array_record so readers get random access:

  builder = build_shapes_world(data_dir)                # generates once, later calls reuse it
  source = builder.as_data_source("train")              # source[i] -> dict of numpy arrays
  raw = builder.as_data_source(
      "train", decoders={"image": tfds.decode.SkipDecoding()})  # raw["image"] is PNG bytes

Examples keep generation order on disk (`source[i]["image_id"] == i`). Each example is rendered
from its own seed (config seed, split code, index), so splits are disjoint and any example can be
regenerated on its own. The category table is in `builder.info.metadata` ("categories",
"frequency_groups").

Reading notes (tfds 4.9): a data-source example's "objects" is a dict of per-object lists (bbox
float32 [4], label, area, mask uint8 [S, S, 1] with 255 on visible pixels), so stack them with
np.asarray; SkipDecoding works for the top-level "image" but not for the nested "mask";
`as_dataset` (tf.data) is not available for array_record files.
"""

from __future__ import annotations

import dataclasses
import io
from typing import Any, Iterator

import numpy as np
import tensorflow_datasets as tfds
from PIL import Image

from rovit_jax.data import shapes_world
from rovit_jax.data.settings import WorldSettings

_SPLIT_CODES = {"train": 0, "validation": 1, "test": 2}


def config_name(
    image_size: int, num_train: int, num_validation: int, num_test: int, max_objects: int, seed: int
) -> str:
    """Config name encoding every generation parameter, e.g. "s128_n6000-500-500_o6_seed0"."""
    return f"s{image_size}_n{num_train}-{num_validation}-{num_test}_o{max_objects}_seed{seed}"


_W = WorldSettings  # the one place of these parameters' defaults and bounds


@dataclasses.dataclass(eq=False)
class ShapesWorldConfig(tfds.core.BuilderConfig):
    """Generation parameters of the shapes world (`data.settings.WorldSettings`, which checks
    them); the name is derived from them when left empty."""

    name: str = ""
    image_size: int = _W.image_size
    num_train: int = _W.num_train
    num_validation: int = _W.num_validation
    num_test: int = _W.num_test
    max_objects: int = _W.max_objects
    seed: int = _W.seed

    def __post_init__(self):
        world = WorldSettings.checked(
            **{f.name: getattr(self, f.name) for f in dataclasses.fields(WorldSettings)}
        )
        if not self.name:
            self.name = config_name(**world.as_kwargs())
        if not self.description:
            self.description = (
                f"{self.image_size}px scenes with 1..{self.max_objects} objects; "
                f"{self.num_train}/{self.num_validation}/{self.num_test} train/validation/test "
                f"images from seed {self.seed}."
            )


def _png(array: np.ndarray) -> bytes:
    buf = io.BytesIO()
    # Level 1: these images are small and cheap to decode; faster builds matter more.
    Image.fromarray(array).save(buf, format="PNG", compress_level=1)
    return buf.getvalue()


def render_example(
    seed: int, split_code: int, index: int, image_size: int, max_objects: int
) -> dict[str, Any]:
    """One tfds example (images already PNG-encoded) for scene `index` of a split."""
    rng = np.random.default_rng([seed, split_code, index])
    scene = shapes_world.render_scene(rng, image_size, max_objects=max_objects)
    masks = scene["masks"]
    return {
        "image": _png(scene["image"]),
        "image_id": index,
        "caption": scene["caption"],
        "objects": {
            "bbox": scene["boxes"],
            "label": scene["labels"].astype(np.int64),
            "area": masks.sum(axis=(1, 2)).astype(np.int64),
            # 255 on visible pixels so the PNGs are viewable; readers should test `mask > 0`.
            "mask": [_png(m.astype(np.uint8) * 255) for m in masks],
        },
    }


class ShapesWorld(tfds.core.GeneratorBasedBuilder):
    """Procedural open-vocabulary shapes world (images, captions, boxes, masks)."""

    VERSION = tfds.core.Version("3.1.0")
    RELEASE_NOTES = {
        "1.0.0": 'Initial release: 34 "colour shape" categories.',
        "2.0.0": "32 shape categories, random unnamed object colours, larger objects.",
        "3.0.0": "32 surface categories (pattern x colour) on random unnamed silhouettes.",
        "3.1.0": "Stripes are mid grey (were the object's colour darkened, as dark as the dots).",
    }
    BUILDER_CONFIGS = [ShapesWorldConfig()]

    def _info(self) -> tfds.core.DatasetInfo:
        cfg: ShapesWorldConfig = self.builder_config
        size = cfg.image_size
        metadata = tfds.core.MetadataDict(
            categories=[dataclasses.asdict(c) for c in shapes_world.CATEGORIES],
            frequency_groups=shapes_world.frequency_groups(),
            image_size=size,
            max_objects=cfg.max_objects,
            seed=cfg.seed,
            bbox_format="normalised (ymin, xmin, ymax, xmax), pixel-edge tight bounds of the mask",
        )
        return self.dataset_info_from_configs(
            description="Procedurally generated shapes with captions, boxes and instance masks.",
            features=tfds.features.FeaturesDict(
                {
                    "image": tfds.features.Image(shape=(size, size, 3), encoding_format="png"),
                    "image_id": tfds.features.Scalar(np.int64),
                    "caption": tfds.features.Text(),
                    "objects": tfds.features.Sequence(
                        {
                            "bbox": tfds.features.BBoxFeature(),
                            "label": tfds.features.ClassLabel(names=shapes_world.category_names()),
                            "area": tfds.features.Scalar(np.int64),
                            "mask": tfds.features.Image(
                                shape=(size, size, 1), encoding_format="png"
                            ),
                        }
                    ),
                }
            ),
            supervised_keys=None,
            disable_shuffling=True,  # keep source[i]["image_id"] == i
            metadata=metadata,
        )

    def _split_generators(self, dl_manager: tfds.download.DownloadManager):
        del dl_manager  # nothing to download
        cfg: ShapesWorldConfig = self.builder_config
        sizes = {"train": cfg.num_train, "validation": cfg.num_validation, "test": cfg.num_test}
        return {split: self._generate_examples(split, n) for split, n in sizes.items()}

    def _generate_examples(
        self, split: str, num_examples: int
    ) -> Iterator[tuple[int, dict[str, Any]]]:
        cfg: ShapesWorldConfig = self.builder_config
        code = _SPLIT_CODES[split]
        # A single process renders the default 7000 scenes in about half a minute, so no worker
        # pool (and none of its fork/spawn pitfalls) is needed.
        for index in range(num_examples):
            yield index, render_example(cfg.seed, code, index, cfg.image_size, cfg.max_objects)


def shapes_builder(data_dir: str, **world: int) -> tfds.core.DatasetBuilder:
    """The (possibly not yet built) shapes-world builder under data_dir for the generation
    parameters `world` (`WorldSettings`' fields; the others at their defaults)."""
    config = ShapesWorldConfig(**world)
    # tfds refuses a new config object that shares its name with a predefined one.
    predefined = config.name in ShapesWorld.builder_configs
    return ShapesWorld(
        data_dir=data_dir, config=config.name if predefined else config, file_format="array_record"
    )


def build_shapes_world(data_dir: str, **kwargs: int) -> tfds.core.DatasetBuilder:
    """Builds the dataset under data_dir unless it already exists; returns the builder.

    Accepts the keyword arguments of `shapes_builder`. Never touches the network.
    """
    builder = shapes_builder(data_dir, **kwargs)
    if not builder.is_prepared():
        builder.download_and_prepare(
            file_format="array_record",
            download_config=tfds.download.DownloadConfig(try_download_gcs=False),
        )
    return builder
