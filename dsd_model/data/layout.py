"""Grid layouts: parsing `COLUMNSxROWS`, naming panels, and cutting a grid into its panels exactly."""

from __future__ import annotations

import re
from dataclasses import dataclass

from PIL import Image

from ..errors import InputError

_ROW_WORDS = {1: [""], 2: ["top", "bottom"], 3: ["top", "middle", "bottom"]}
_COLUMN_WORDS = {1: [""], 2: ["left", "right"], 3: ["left", "centre", "right"]}


@dataclass(frozen=True)
class GridLayout:
    """`columns` x `rows` panels, numbered in reading order (left to right, then top to bottom)."""

    columns: int
    rows: int

    def __str__(self) -> str:
        return f"{self.columns}x{self.rows}"

    def describe(self) -> str:
        """Words for the shape: `2 columns, 2 rows` or `1 column, 2 rows`."""
        return f"{self.columns} column{'s' * (self.columns > 1)}, {self.rows} row{'s' * (self.rows > 1)}"

    @property
    def panels(self) -> int:
        return self.columns * self.rows

    def panel_names(self) -> list[str]:
        """Position words in reading order: "top left", "top right", ... ("row 4 column 1" beyond 3 per side)."""
        rows = _ROW_WORDS.get(self.rows, [f"row {i + 1}" for i in range(self.rows)])
        columns = _COLUMN_WORDS.get(self.columns, [f"column {j + 1}" for j in range(self.columns)])
        return [" ".join(word for word in (row, column) if word) for row in rows for column in columns]

    def panel_size(self, width: int, height: int) -> tuple[int, int]:
        if width % self.columns or height % self.rows:
            raise InputError(
                "layout",
                f"a {width}x{height} grid does not divide into {self} panels: the width must be a multiple of "
                f"{self.columns} and the height a multiple of {self.rows}",
            )
        return width // self.columns, height // self.rows


def parse_layout(text: str) -> GridLayout:
    """`"2x2"` → 2 columns, 2 rows; `"2x1"` → two panels side by side; `"1x2"` → two panels stacked."""
    match = re.fullmatch(r"\s*(\d+)\s*[xX]\s*(\d+)\s*", str(text))
    if not match:
        raise InputError("layout", f"{text!r} is not COLUMNSxROWS, e.g. '2x2' or '1x2'")
    layout = GridLayout(int(match.group(1)), int(match.group(2)))
    if layout.columns < 1 or layout.rows < 1 or layout.panels < 2:
        raise InputError("layout", f"{text!r} has {layout.panels} panel(s); a grid needs at least 2 to make pairs")
    return layout


def split_grid(grid: Image.Image, layout: GridLayout) -> list[Image.Image]:
    """The panels of `grid` in reading order, each exactly (width / columns) x (height / rows) pixels."""
    width, height = layout.panel_size(*grid.size)
    return [
        grid.crop((column * width, row * height, (column + 1) * width, (row + 1) * height))
        for row in range(layout.rows)
        for column in range(layout.columns)
    ]
