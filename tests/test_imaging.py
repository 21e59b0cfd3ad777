"""Decoding one photo for the model: formats, bad input, orientation, draft mode, official parity, content hash."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from images import KINDS, W, H, available_kinds, jpeg_bytes, make_image, photo_like, run_unprivileged, write_dng
from PIL import Image
from timm.data import IMAGENET_DEFAULT_MEAN as IMAGENET_MEAN, IMAGENET_DEFAULT_STD as IMAGENET_STD
from torchvision import transforms

from ramcli.errors import RamcliError

from ramcli.media.decode import ImageError, content_hash, load_for_model, normalize

S = 32


def official(path: Path, size: int) -> torch.Tensor:
    """The official RAM preprocessing (recognize-anything `get_transform`), applied to `convert('RGB')`."""
    tf = transforms.Compose(
        [transforms.Resize((size, size)), transforms.ToTensor(), transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)]
    )
    with Image.open(path) as img:
        return tf(img.convert("RGB"))


@pytest.mark.parametrize("kind", available_kinds())
def test_every_sample_decodes_or_fails_with_a_one_line_reason(tmp_path, kind):
    path = tmp_path / KINDS[kind]
    expected = make_image(path, kind)
    if expected.decodes:
        decoded = load_for_model(path, S)
        assert decoded.pixels.shape == (3, S, S) and decoded.pixels.dtype == torch.uint8
        assert (decoded.width, decoded.height) == expected.size
        assert len(decoded.content_hash) == 32
    else:
        with pytest.raises(ImageError) as info:
            load_for_model(path, S)
        message = str(info.value)
        assert expected.reason in message and "\n" not in message and "Traceback" not in message
        assert isinstance(info.value, RamcliError)


@pytest.mark.slow
def test_bad_inputs_print_nothing(tmp_path):
    """Warnings and tracebacks from Pillow or LibRaw must not reach the terminal."""
    paths = [tmp_path / KINDS[kind] for kind in available_kinds()]
    for path, kind in zip(paths, available_kinds()):
        make_image(path, kind)
    code = (
        "import sys\nfrom ramcli.media.decode import load_for_model, ImageError\n"
        "for p in sys.argv[1:]:\n"
        "    try: load_for_model(p, 32)\n"
        "    except ImageError: pass\n"
    )
    done = subprocess.run([sys.executable, "-W", "default", "-c", code, *map(str, paths)], capture_output=True, text=True)
    assert done.returncode == 0 and done.stdout == "" and done.stderr == ""


def test_missing_file_and_directory_are_one_line_errors(tmp_path):
    with pytest.raises(ImageError, match="^no such file or directory$"):
        load_for_model(tmp_path / "gone.jpg", S)
    with pytest.raises(ImageError, match="^is a directory$"):
        load_for_model(tmp_path, S)


@pytest.mark.slow
def test_permission_denied_is_a_one_line_error():
    out = run_unprivileged(
        "from images import make_image\nfrom ramcli.media.decode import load_for_model, ImageError\n"
        "p = WORKDIR / 'locked.jpg'\nmake_image(p, 'jpeg')\np.chmod(0)\n"
        "try:\n    load_for_model(p, 32)\nexcept ImageError as exc:\n    print(exc)\n"
    )
    assert out == "permission denied"


def test_read_only_file_decodes(tmp_path):
    path = tmp_path / "ro.jpg"
    make_image(path, "jpeg")
    path.chmod(0o444)
    assert load_for_model(path, S).pixels.shape == (3, S, S)


def test_bomb_guard_stays_on():
    import ramcli.media.decode  # noqa: F401

    assert Image.MAX_IMAGE_PIXELS is not None and Image.MAX_IMAGE_PIXELS > 0


def test_animated_gif_gives_its_first_frame(tmp_path):
    path = tmp_path / "a.gif"
    make_image(path, "gif_animated")
    pixels = load_for_model(path, S).pixels.float()
    assert pixels[0].mean() > 250 and pixels[1].mean() < 5 and pixels[2].mean() < 5  # red, the first frame


def test_exif_orientation_is_applied(tmp_path):
    rotated, upright = tmp_path / "rotated.jpg", tmp_path / "upright.png"
    make_image(rotated, "jpeg_rotated")
    with Image.open(rotated) as img:
        assert img.size == (W, H)  # stored landscape
        img.transpose(Image.Transpose.ROTATE_270).save(upright)  # orientation 6 = rotate 90 degrees clockwise
    decoded = load_for_model(rotated, S, draft=False)
    assert (decoded.width, decoded.height) == (H, W)
    assert torch.equal(decoded.pixels, load_for_model(upright, S, draft=False).pixels)


def test_taken_at_comes_from_exif(tmp_path):
    path = tmp_path / "dated.jpg"
    make_image(path, "jpeg")
    assert load_for_model(path, S).taken_at.isoformat() == "2021-07-04T12:34:56"
    make_image(path, "png")
    assert load_for_model(path, S).taken_at is None


def test_sixteen_bit_grey_is_scaled_not_clipped(tmp_path):
    """convert('RGB') clips 16-bit values to white; ramcli keeps the ramp."""
    path = tmp_path / "ramp.png"
    make_image(path, "png16")
    pixels = load_for_model(path, S).pixels.float()
    assert 120 < pixels.mean() < 135 and pixels.min() < 10 and pixels.max() > 245


@pytest.mark.parametrize(
    "kind", ["jpeg", "jpeg_cmyk", "jpeg_grey", "png", "png_alpha", "png_palette_alpha", "tiff", "webp", "bmp", "heic", "gif_animated"]
)
def test_without_draft_equals_the_official_transform(tmp_path, kind):
    path = tmp_path / f"s_{kind}"
    make_image(path, kind)
    ours = normalize(load_for_model(path, 24, draft=False).pixels.unsqueeze(0))[0]
    torch.testing.assert_close(ours, official(path, 24), atol=1e-6, rtol=0)


def test_real_photos_without_draft_equal_the_official_transform(sample_photos):
    assert sample_photos
    for path in sample_photos:
        ours = normalize(load_for_model(path, 384, draft=False).pixels.unsqueeze(0))[0]
        torch.testing.assert_close(ours, official(path, 384), atol=1e-6, rtol=0)


def test_draft_differs_only_slightly(tmp_path, sample_photos):
    generated = tmp_path / "big.jpg"
    generated.write_bytes(jpeg_bytes(photo_like(1024, 768, seed=3)))
    for path, size in [(generated, 64), *[(p, 384) for p in sample_photos]]:
        full = load_for_model(path, size, draft=False).pixels.float()
        fast = load_for_model(path, size, draft=True).pixels.float()
        diff = (full - fast).abs().mean().item()
        with Image.open(path) as img:
            scaled = min(img.size) >= 4 * size  # draft only kicks in at 2x or more below the original
        assert diff < 3.0, f"{path.name}: mean abs diff {diff:.2f} levels"
        assert (diff > 0) == scaled, f"{path.name}: draft {'did not change' if scaled else 'changed'} the pixels"


def test_normalize_matches_totensor_normalize_in_any_dtype():
    batch = torch.randint(0, 256, (2, 3, 5, 5), dtype=torch.uint8)
    reference = torch.stack([transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)(b.float() / 255) for b in batch])
    torch.testing.assert_close(normalize(batch), reference, atol=1e-6, rtol=0)
    half = normalize(batch, dtype=torch.bfloat16)
    assert half.dtype == torch.bfloat16
    torch.testing.assert_close(half.float(), reference, atol=2e-2, rtol=1e-2)


@pytest.mark.parametrize("kind", ["jpeg", "png", "heic", "tiff"])
def test_content_hash_survives_metadata_writes_and_follows_pixels(tmp_path, kind):
    path = tmp_path / f"photo.{ 'jpg' if kind == 'jpeg' else kind }"
    make_image(path, kind)
    before = content_hash(path)
    bytes_before = path.read_bytes()
    subprocess.run(
        ["exiftool", "-q", "-XMP-dc:Subject+=beach", "-IPTC:Keywords+=beach", "-EXIF:Artist=someone", "-overwrite_original", str(path)],
        check=True,
        capture_output=True,
    )
    assert path.read_bytes() != bytes_before  # the metadata really changed
    assert content_hash(path) == before
    assert load_for_model(path, S).content_hash == before
    with Image.open(path) as img:
        changed = img.convert("RGB")
    changed.putpixel((0, 0), (255, 0, 255) if changed.getpixel((0, 0)) != (255, 0, 255) else (0, 0, 0))
    changed.save(path, format=Image.open(path).format, **({"quality": 100} if kind == "jpeg" else {}))
    assert content_hash(path) != before


def test_raw_preview_hash_is_the_same_both_ways(tmp_path):
    path = tmp_path / "camera.dng"
    make_image(path, "dng")
    assert load_for_model(path, S).content_hash == content_hash(path)


def test_content_hash_errors_are_one_line(tmp_path):
    path = tmp_path / "notes.jpg"
    make_image(path, "text_as_jpg")
    with pytest.raises(ImageError, match=r"^not an image \(text\)$"):
        content_hash(path)


def test_raw_preview_follows_the_raw_orientation(tmp_path):
    preview = photo_like(W, H, seed=5)
    write_dng(tmp_path / "portrait.dng", preview, orientation=6)
    preview.transpose(Image.Transpose.ROTATE_270).save(tmp_path / "upright.png")
    decoded = load_for_model(tmp_path / "portrait.dng", S, draft=False)
    assert (decoded.width, decoded.height) == (H, W)
    upright = load_for_model(tmp_path / "upright.png", S, draft=False).pixels.float()
    assert (decoded.pixels.float() - upright).abs().mean() < 4  # the preview is a JPEG of the same pixels


def test_the_model_data_config_drives_resize_and_normalisation(tmp_path):
    """Interpolation, mean and std come from the data config (timm's keys), not from constants."""
    from timm.data import OPENAI_CLIP_MEAN, OPENAI_CLIP_STD, resolve_data_config

    from ramcli.media.decode import model_input
    from ramcli.models.configs import get_arch
    from ramcli.models.ram import RecognitionModel

    img = photo_like(96, 64, seed=5)
    path = tmp_path / "p.png"
    img.save(path)
    for interpolation, pil in (("bilinear", Image.Resampling.BILINEAR), ("bicubic", Image.Resampling.BICUBIC)):
        want = torch.from_numpy(np.array(img.resize((S, S), pil))).permute(2, 0, 1)
        assert torch.equal(load_for_model(path, S, interpolation=interpolation).pixels, want)
        assert torch.equal(model_input(img, {"input_size": (3, S, S), "interpolation": interpolation}), want)
    with torch.device("meta"):
        model = RecognitionModel(get_arch("ram_tiny"))
    assert resolve_data_config(model=model) == {**model.pretrained_cfg, "input_size": (3, 64, 64)}
    assert model.pretrained_cfg["crop_mode"] == "squash" and model.pretrained_cfg["crop_pct"] == 1.0
    batch = torch.full((1, 3, 2, 2), 128, dtype=torch.uint8)
    clip = normalize(batch, {"mean": OPENAI_CLIP_MEAN, "std": OPENAI_CLIP_STD})
    assert clip[0, 0, 0, 0].item() == pytest.approx((128 / 255 - OPENAI_CLIP_MEAN[0]) / OPENAI_CLIP_STD[0], abs=1e-6)
    assert not torch.allclose(clip, normalize(batch))


def test_cpu_tagging_decodes_jpegs_in_full_by_default(tmp_path, monkeypatch):
    """On the CPU the pipeline gives the official full decode; draft mode only when asked."""
    import ramcli.tagging.pipeline as pipeline
    from ramcli.models.labels import LabelSet
    from ramcli.models.configs import get_arch
    from ramcli.models.ram import RecognitionModel
    from ramcli.tagging.tagger import Tagger

    path = tmp_path / "big.jpg"
    photo_like(1600, 1200, seed=2).save(path, quality=90)
    arch = get_arch("ram_tiny")
    names = tuple(f"t{i}" for i in range(arch.num_classes))
    tagger = Tagger(RecognitionModel(arch, LabelSet(names, names, (0.5,) * arch.num_classes)), torch.device("cpu"))
    pixels = {}
    for decode in ("auto", "workers", "draft"):
        batch, _, _ = next(pipeline.iter_batches([path], tagger, 1, 0, decode=pipeline.resolve_decode(tagger.device, decode)))
        pixels[decode] = batch.pixels[0]
    full, draft = load_for_model(path, 64).pixels, load_for_model(path, 64, draft=True).pixels
    assert not torch.equal(full, draft)
    assert torch.equal(pixels["auto"], full) and torch.equal(pixels["workers"], full)
    assert torch.equal(pixels["draft"], draft)
