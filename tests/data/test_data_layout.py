import numpy as np
import pytest
from PIL import Image

from dsd_model.data.layout import GridLayout, parse_layout, split_grid
from dsd_model.data.settings import DataSettings
from dsd_model.errors import InputError


def test_parse_layout_reads_columns_then_rows():
    assert parse_layout("2x2") == GridLayout(2, 2)
    assert parse_layout(" 1X2 ") == GridLayout(columns=1, rows=2)
    assert str(parse_layout("3x1")) == "3x1"


@pytest.mark.parametrize("text", ["2by2", "2x", "x2", "-1x2", "2x2x2", ""])
def test_parse_layout_refuses_malformed_strings(text):
    with pytest.raises(InputError, match="layout: .* is not COLUMNSxROWS"):
        parse_layout(text)


@pytest.mark.parametrize("text", ["1x1", "0x2"])
def test_parse_layout_needs_two_panels(text):
    with pytest.raises(InputError, match="a grid needs at least 2"):
        parse_layout(text)


def test_panel_names_follow_reading_order():
    assert parse_layout("2x2").panel_names() == ["top left", "top right", "bottom left", "bottom right"]
    assert parse_layout("1x2").panel_names() == ["top", "bottom"]
    assert parse_layout("2x1").panel_names() == ["left", "right"]
    assert parse_layout("1x4").panel_names()[3] == "row 4"


@pytest.mark.parametrize("layout, size", [("2x2", (64, 48)), ("1x2", (32, 64)), ("3x1", (48, 16)), ("2x3", (30, 33))])
def test_split_grid_is_exact(layout, size):
    pixels = np.random.default_rng(0).integers(0, 256, (size[1], size[0], 3), dtype=np.uint8)
    grid = parse_layout(layout)
    panels = split_grid(Image.fromarray(pixels), grid)
    width, height = size[0] // grid.columns, size[1] // grid.rows
    assert len(panels) == grid.panels
    for index, panel in enumerate(panels):
        row, column = divmod(index, grid.columns)
        expected = pixels[row * height : (row + 1) * height, column * width : (column + 1) * width]
        assert panel.size == (width, height)
        np.testing.assert_array_equal(np.asarray(panel), expected)
    rows = [panels[r * grid.columns : (r + 1) * grid.columns] for r in range(grid.rows)]
    reassembled = np.vstack([np.hstack([np.asarray(p) for p in row]) for row in rows])
    np.testing.assert_array_equal(reassembled, pixels)


def test_split_grid_refuses_sizes_that_do_not_divide():
    with pytest.raises(InputError, match=r"65x64 grid does not divide into 2x2 panels"):
        split_grid(Image.new("RGB", (65, 64)), parse_layout("2x2"))


def test_settings_check_grid_geometry():
    with pytest.raises(ValueError, match="must be a multiple of 16"):
        DataSettings(width=100)
    with pytest.raises(ValueError, match="does not divide into 3x1 panels"):
        DataSettings(layout="3x1", width=64, height=64)
    assert DataSettings(layout="1x2", width=512, height=1024).grid_layout == GridLayout(1, 2)
