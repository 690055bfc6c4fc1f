"""The image files the GPU data backend must survive."""
import numpy as np
from PIL import Image


def undecodable_jpeg(path, size=(640, 480)):
    """A JPEG whose header reads (size, RGB, the end marker last) but whose pixels no
    decoder reads: its components name a quantisation table it does not define."""
    Image.new("RGB", size, (90, 120, 30)).save(path, quality=90)
    raw = bytearray(path.read_bytes())
    frame = raw.index(b"\xff\xc0")
    for component in range(raw[frame + 9]):
        raw[frame + 10 + 3 * component + 2] = 3
    path.write_bytes(bytes(raw))

def write_odd_files(folder, large):
    """The files the GPU backend must survive: CMYK, grayscale, progressive, PNG,
    truncated, undecodable, and a large photo (a big downscale)."""
    folder.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(1)
    colour = Image.fromarray(rng.integers(0, 256, (120, 160, 3), dtype=np.uint8))
    colour.convert("CMYK").save(folder / "cmyk.JPEG", quality=90)
    colour.convert("L").save(folder / "gray.JPEG", quality=90)
    colour.save(folder / "progressive.JPEG", quality=90, progressive=True)
    colour.save(folder / "png.JPEG", format="PNG")  # a PNG named like a JPEG, as in ImageNet
    colour.save(folder / "whole.JPEG", quality=90)
    cut = (folder / "whole.JPEG").read_bytes()
    (folder / "truncated.JPEG").write_bytes(cut[: len(cut) // 2])
    (folder / "whole.JPEG").unlink()
    undecodable_jpeg(folder / "undecodable.JPEG")
    width, height = large
    y, x = np.mgrid[0:height:8, 0:width:8]
    small = np.stack([x % 256, y % 256, (x + y) % 256], -1).astype(np.uint8)
    Image.fromarray(small).resize((width, height)).save(folder / "large.JPEG", quality=85)
