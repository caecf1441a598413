"""A Hugging Face DatasetDict saved with `save_to_disk` as an image source (util/sources.py picks it).

The images are read as their encoded bytes and decoded by util.datasets.load_image, as every other source's
files; `datasets` is optional (requirements-data.txt) and imported when such a folder is opened.
"""
import io
from typing import Any, Tuple

from torch.utils.data import Dataset

from util.datasets import BadSamplePolicy, load_image
from util.errors import DataError, UserError
from util.optional import require_package
from util.pixels import load_pixels

HF_SPLITS = {"train": ("train",), "val": ("validation", "val")}


class HFImages(BadSamplePolicy, Dataset):
    """One split of a DatasetDict saved with save_to_disk: `image_column` (an Image feature) and `label_column`."""

    def __init__(self, root: str, split: str, image_column: str = "image", label_column: str = "label",
                 strict: bool = False, in_chans: int = 3):
        require_package("datasets", "reading a Hugging Face dataset")
        import datasets
        self.root = root
        self.in_chans, self.float_pixels = in_chans, in_chans != 3
        splits = datasets.load_from_disk(root)
        name = next((s for s in HF_SPLITS.get(split, (split,)) if s in splits), None)
        if name is None:
            raise DataError(f"the Hugging Face dataset in {root} has no {' or '.join(HF_SPLITS.get(split, (split,)))} "
                            f"split (it has {', '.join(splits)})")
        ds = splits[name]
        for column, flag in ((image_column, "--image_column"), (label_column, "--label_column")):
            if column not in ds.column_names:
                raise UserError(f"the {name} split of {root} has no column '{column}' (it has "
                                f"{', '.join(ds.column_names)}); name the right one with {flag}")
        if not isinstance(ds.features[image_column], datasets.Image):
            raise UserError(f"column '{image_column}' of {root} is {type(ds.features[image_column]).__name__}, not an "
                            f"image; name the image column with --image_column")
        # the encoded bytes, decoded by load_image as every other source's files
        self.ds = ds.cast_column(image_column, datasets.Image(decode=False))
        self.image_column, self.label_column, self.split = image_column, label_column, name
        feature = ds.features[label_column]
        if not isinstance(feature, datasets.ClassLabel) and not (
                isinstance(feature, datasets.Value) and feature.dtype.startswith(("int", "uint"))):
            raise UserError(f"column '{label_column}' of {root} is not a class label (it is {feature}); name the "
                            f"label column with --label_column")
        self.classes = list(feature.names) if isinstance(feature, datasets.ClassLabel) else \
            [str(i) for i in range(max(ds[label_column]) + 1)]
        self._track_bad_samples(len(ds), strict)

    def __len__(self) -> int:
        return len(self.ds)

    def encoded(self, index: int) -> Tuple[bytes, int]:
        """(the image's encoded bytes, the label) of row `index`, undecoded (what the DALI loader feeds)."""
        row = self.ds[index]
        image = row[self.image_column]
        if image.get("bytes"):
            return image["bytes"], int(row[self.label_column])
        if not image.get("path"):
            raise ValueError("no image in this row (neither bytes nor a path)")
        with open(image["path"], "rb") as f:
            return f.read(), int(row[self.label_column])

    def read(self, index: int) -> Any:
        data, label = self.encoded(index)
        if self.float_pixels:
            image = self.ds[index][self.image_column]
            return load_pixels(data, self.in_chans, image.get("path") or f"row {index}.png"), label
        return load_image(io.BytesIO(data)), label

    def describe(self, index: int) -> str:
        return f"row {index} of the {self.split} split of {self.root}"

    def fingerprint(self) -> str:
        return f"hf:{self.ds._fingerprint}:{len(self.ds)}"

    def __repr__(self) -> str:
        return (f"HFImages\n    Number of datapoints: {len(self)}\n    Root location: {self.root} ({self.split})\n"
                f"    Classes: {len(self.classes)}")
