"""Image folders as users have them: every Pillow mode, transparency, EXIF, sizes, bad files, the decoded cache.

Unit tests build small images; the tests of the real path use real colour images: the 64x64 Twemoji PNGs
(modes RGBA and P with transparency mixed) that `make images` fetches with npm (scripts/get-images.sh).
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

import vaelab
from conftest import vaelab_cmd
from vaelab.cli import main
from vaelab.data import cache, folders, load_dataset
from vaelab.data.folders import Options, decode
from vaelab.errors import ConfigError, DataError


@pytest.fixture
def own_cache(tmp_path, monkeypatch) -> Path:
    """A decoded cache of this test's own, so entries can be counted."""
    root = tmp_path / "decoded"
    monkeypatch.setenv("VAELAB_CACHE", str(root))
    return root


def _copy(files: list[Path], dest: Path) -> Path:
    dest.mkdir(parents=True, exist_ok=True)
    for f in files:
        shutil.copy(f, dest / f.name)
    return dest


def _run(capsys, *args) -> tuple[int, str, str]:
    """The CLI's main() in this process (the same parsing and error handling as `vaelab`, without the start-up
    of another Python on a busy machine): (exit status, stdout, stderr)."""
    capsys.readouterr()
    code = main(list(args))
    out, err = capsys.readouterr()
    return code, out, err


# ------------------------------------------------------------------------------------------- modes, one layout
def _decoded(tmp_path, im: Image.Image, name: str, **opts) -> tuple[np.ndarray, bool]:
    p = tmp_path / name
    im.save(p, **({"lossless": True} if name.endswith(".webp") else {}))
    return decode(p, Options(**opts))


def _p_image(transparent: bool) -> Image.Image:
    im = Image.new("P", (4, 2))
    im.putpalette([255, 0, 0, 0, 0, 255] + [0] * 762)  # 0 red, 1 blue
    im.putdata([0, 0, 1, 1, 0, 0, 1, 1])
    if transparent:
        im.info["transparency"] = 1  # blue is transparent
    return im


@pytest.mark.parametrize(("make", "name", "grey", "pixel"), [
    (lambda: Image.new("1", (4, 2), 1), "a.png", True, (255, 255, 255)),
    (lambda: Image.new("L", (4, 2), 77), "a.png", True, (77, 77, 77)),
    (lambda: Image.new("LA", (4, 2), (77, 0)), "a.png", True, (255, 255, 255)),  # transparent -> background
    (lambda: Image.new("LA", (4, 2), (77, 255)), "a.png", True, (77, 77, 77)),
    (lambda: _p_image(False), "a.png", False, (255, 0, 0)),
    (lambda: Image.new("RGB", (4, 2), (10, 200, 30)), "a.bmp", False, (10, 200, 30)),
    (lambda: Image.new("RGBA", (4, 2), (10, 200, 30, 0)), "a.png", False, (255, 255, 255)),
    (lambda: Image.new("RGBA", (4, 2), (10, 200, 30, 255)), "a.webp", False, (10, 200, 30)),
    (lambda: Image.new("CMYK", (4, 2), (0, 255, 255, 0)), "a.tif", False, (255, 0, 0)),
    (lambda: Image.fromarray(np.full((2, 4), 65535 // 3, np.uint16)), "a.png", True, (85, 85, 85)),  # I;16
    (lambda: Image.new("RGB", (4, 2), (0, 0, 250)), "a.gif", False, (0, 0, 250)),
])
def test_every_mode_becomes_grey_or_rgb(tmp_path, make, name, grey, pixel):
    a, g = _decoded(tmp_path, make(), name)
    assert a.shape == (2, 4, 3)
    assert a.dtype == np.uint8
    assert g is grey
    assert tuple(int(v) for v in a[0, 0]) == pixel


def test_palette_transparency_is_composited_over_the_background(tmp_path):
    white, _ = _decoded(tmp_path, _p_image(True), "p.png")
    black, _ = _decoded(tmp_path, _p_image(True), "p.png", background="black")
    assert white[0, 0].tolist() == [255, 0, 0]
    assert black[0, 0].tolist() == [255, 0, 0]  # opaque red stays
    assert white[0, 2].tolist() == [255, 255, 255]
    assert black[0, 2].tolist() == [0, 0, 0]


def test_half_transparent_pixels_blend_with_the_background(tmp_path):
    a, _ = _decoded(tmp_path, Image.new("RGBA", (2, 2), (0, 0, 0, 128)), "h.png")
    assert abs(int(a[0, 0, 0]) - 127) <= 1


def test_first_frame_of_an_animated_gif(tmp_path):
    frames = [Image.new("RGB", (4, 4), c) for c in ((255, 0, 0), (0, 255, 0))]
    p = tmp_path / "anim.gif"
    frames[0].save(p, save_all=True, append_images=frames[1:])
    a, _ = decode(p, Options())
    assert a[0, 0].tolist() == [255, 0, 0]


def test_exif_orientation_is_applied(tmp_path):
    im = Image.new("RGB", (8, 4), (0, 0, 255))
    im.paste((255, 0, 0), (0, 0, 4, 4))  # left half red, right half blue
    exif = Image.Exif()
    exif[0x0112] = 6  # "rotate 90° clockwise to display"
    p = tmp_path / "photo.jpg"
    im.save(p, exif=exif, quality=95)
    a, _ = decode(p, Options())
    assert a.shape == (8, 4, 3)  # upright: 4 wide, 8 tall
    assert a[1, 2, 0] > 200
    assert a[1, 2, 2] < 60  # the red half is now on top
    assert a[6, 2, 2] > 200
    assert a[6, 2, 0] < 60


def test_grey_folder_stays_one_channel_and_mixed_folder_is_rgb(tmp_path, own_cache):
    (tmp_path / "grey").mkdir()
    for i in range(4):
        Image.new("L", (6, 5), 40 * i).save(tmp_path / "grey" / f"{i}.png")
    assert load_dataset(str(tmp_path / "grey")).shape == (1, 5, 6)
    shutil.copytree(tmp_path / "grey", tmp_path / "mixed")
    Image.new("RGB", (6, 5), (200, 10, 10)).save(tmp_path / "mixed" / "colour.png")
    data = load_dataset(str(tmp_path / "mixed"))
    assert data.shape == (3, 5, 6)
    x = np.concatenate([data.train, data.test])
    assert sum(bool((im[0] == 200).all() and (im[1] == 10).all()) for im in x) == 1  # the red one
    greys = [im for im in x if not (im[0] == 200).all()]
    assert all((im[0] == im[1]).all() and (im[1] == im[2]).all() for im in greys)  # grey repeated


def test_hidden_and_non_image_files_are_skipped_and_counted(tmp_path, own_cache):
    d = tmp_path / "f"
    for cls in ("a", "b"):
        (d / cls).mkdir(parents=True)
        for i in range(3):
            Image.new("RGB", (4, 4), (50 * i, 0, 0)).save(d / cls / f"{i}.png")
    (d / ".DS_Store").write_bytes(b"\0\0\0\1Bud1")
    (d / "a" / ".hidden.png").write_bytes(b"not even an image")
    (d / ".git").mkdir()
    (d / ".git" / "x.png").write_bytes(b"ignored with its folder")
    (d / "README.txt").write_text("about these images")
    (d / "b" / "labels.csv").write_text("0,1\n")
    data = load_dataset(str(d))
    assert data.classes == ["a", "b"]
    assert len(data.train) + len(data.test) == 6
    assert data.skipped == {"hidden": 3, "non_image": 2, "bad": 0}


# ------------------------------------------------------------------------------------------- sizes
def test_image_size_resizes_the_shorter_side_and_centre_crops(tmp_path, own_cache):
    d = tmp_path / "f"
    d.mkdir()
    wide = Image.new("RGB", (90, 30), (0, 0, 255))
    wide.paste((255, 0, 0), (30, 0, 60, 30))  # the centre third red
    wide.save(d / "wide.png")
    Image.new("RGB", (20, 40), (0, 255, 0)).save(d / "tall.png")
    data = load_dataset(str(d), image_size=15)
    assert data.shape == (3, 15, 15)
    x = np.concatenate([data.train, data.test])
    red = [im for im in x if im[0].mean() > 100]
    assert len(red) == 1
    assert (red[0][0] > 200).mean() > 0.9  # only the red centre survives the crop
    data = load_dataset(str(d), image_size="8x12")
    assert data.shape == (3, 8, 12)


def test_center_crop_before_resize(tmp_path, own_cache):
    d = tmp_path / "f"
    d.mkdir()
    for i in range(2):
        im = Image.new("L", (178, 218), 0)
        im.paste(255, (19, 39, 159, 179))  # a white 140x140 centre, as a CelebA face
        im.save(d / f"{i}.png")
    data = load_dataset(str(d), image_size=64, center_crop=140)
    assert data.shape == (1, 64, 64)
    assert int(data.train.min()) == 255
    (d / "small.png").write_bytes((d / "0.png").read_bytes())
    Image.new("L", (100, 100)).save(d / "small.png")
    with pytest.raises(DataError, match=r"small.png: is 100x100 pixels, smaller than --center-crop 140x140"):
        load_dataset(str(d), image_size=64, center_crop=140)


def test_real_folder_of_mixed_sizes_needs_image_size(emoji_dir, tmp_path, own_cache):
    d = tmp_path / "sizes"
    d.mkdir()
    for i, f in enumerate(sorted(emoji_dir.glob("*.png"))[:12]):
        size = (64, 64) if i % 3 == 0 else (48, 48) if i % 3 == 1 else (80, 60)
        Image.open(f).resize(size).save(d / f.name)
    with pytest.raises(DataError, match=r"images differ in size: .* is 64x64 pixels but .* is 48x48 .*--image-size"):
        load_dataset(str(d))
    data = load_dataset(str(d), image_size=32)
    assert data.shape == (3, 32, 32)
    assert data.train.dtype == np.uint8


# ------------------------------------------------------------------------------------------- bad files
def _bad_folder(emoji_dir: Path, d: Path, n: int = 40) -> Path:
    files = sorted(emoji_dir.glob("*.png"))[:n]
    _copy(files, d)
    raw = files[0].read_bytes()
    (d / "truncated.png").write_bytes(raw[: len(raw) // 2])
    (d / "garbage.jpg").write_bytes(b"\xff\xd8\xff not really a jpeg")
    return d


def test_corrupt_files_are_named_or_skipped(emoji_dir, tmp_path, own_cache):
    d = _bad_folder(emoji_dir, tmp_path / "bad")
    with pytest.raises(DataError, match=r"garbage.jpg: cannot decode it .*\(1 more bad files\).*--skip-bad-images"):
        load_dataset(str(d))
    with pytest.warns(UserWarning, match=r"skipped 2 bad image files in .*garbage.jpg .*truncated.png"):
        data = load_dataset(str(d), skip_bad_images=True)
    assert len(data.train) + len(data.test) == 40
    assert data.skipped["bad"] == 2
    with pytest.raises(DataError, match="--skip-bad-images"):  # the cache built with the flag is not trusted without
        load_dataset(str(d))


def test_decompression_bomb_is_a_bad_file(tmp_path, monkeypatch, own_cache):
    d = tmp_path / "f"
    d.mkdir()
    for i in range(3):
        Image.new("L", (20, 20), i).save(d / f"{i}.png")
    Image.new("L", (60, 60)).save(d / "huge.png")
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", 1000)  # 3600 pixels is then "too large to decode safely"
    with pytest.raises(DataError, match=r"huge.png: .*decompression.bomb"):
        load_dataset(str(d))


@pytest.mark.slow
def test_cli_corrupt_file_one_line_then_skip_trains(emoji_dir, tmp_path, capsys):
    d = _bad_folder(emoji_dir, tmp_path / "bad", n=64)
    code, _, err = _run(capsys, "train", "--dataset", str(d), "--arch", "conv", "--epochs", "1", "--latent-dim", "4",
                        "--out", str(tmp_path / "run"), "--quiet")
    assert code == 2
    assert err.count("\n") == 1
    assert "Traceback" not in err
    assert err.startswith("vaelab: error: ")
    assert "garbage.jpg" in err
    assert "--skip-bad-images" in err
    with pytest.warns(UserWarning, match=r"skipped 2 bad image files .*garbage.jpg"):  # printed by the CLI
        code, _, err = _run(capsys, "train", "--dataset", str(d), "--arch", "conv", "--epochs", "1", "--latent-dim",
                            "4", "--out", str(tmp_path / "run"), "--quiet", "--skip-bad-images")
    assert code == 0, err
    config = json.loads((tmp_path / "run" / "config.json").read_text())
    assert config["model"]["data_shape"] == [3, 64, 64]
    assert config["data"]["skip_bad_images"] is True


# ------------------------------------------------------------------------------------------- the real path
@pytest.mark.slow
def test_real_emoji_folder_trains_with_conv(emoji_dir, tmp_path, capsys):
    modes = set()
    for f in sorted(emoji_dir.glob("*.png"))[:400]:
        with Image.open(f) as im:
            modes.add(im.mode)
    assert {"RGBA", "P"} <= modes  # the folder really mixes modes
    out = tmp_path / "run"
    code, _, err = _run(capsys, "train", "--dataset", str(emoji_dir), "--arch", "conv", "--epochs", "1", "--limit",
                        "512", "--latent-dim", "8", "--out", str(out), "--quiet")
    assert code == 0, err
    rows = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    test = [row for row in rows if row["split"] == "test"][-1]
    assert np.isfinite(test["loss"])
    assert json.loads((out / "config.json").read_text())["model"]["data_shape"] == [3, 64, 64]


# ------------------------------------------------------------------------------------------- labels
def _loaded_with_warnings(d: Path):
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")  # every warning given, none folded into an earlier one
        data = load_dataset(str(d))
    return data, [str(w.message) for w in caught]


def test_one_subfolder_is_unlabelled_with_one_warning(emoji_dir, tmp_path, own_cache):
    files = sorted(emoji_dir.glob("*.png"))[:60]
    parent = tmp_path / "parent"
    _copy(files, parent / "only-subfolder")
    for _ in range(2):  # the load that decodes, then the one that maps the cached entry
        data, said = _loaded_with_warnings(parent)
        assert data.train_labels is None
        assert data.test_labels is None
        assert data.classes is None
        assert said == [f"all images in {parent} are in one subfolder (only-subfolder): treated as unlabelled"]
    # two subfolders are two classes: labelled, and nothing to say
    _copy(files[:30], tmp_path / "two" / "a")
    _copy(files[30:], tmp_path / "two" / "b")
    data, said = _loaded_with_warnings(tmp_path / "two")
    assert said == []
    assert data.classes == ["a", "b"]
    assert data.train_labels is not None
    assert set(data.train_labels) == {0, 1}


def test_one_subfolder_trains_and_eval_reports_no_label_agreement(emoji_dir, tmp_path, own_cache, capsys):
    parent = tmp_path / "parent"
    _copy(sorted(emoji_dir.glob("*.png"))[:60], parent / "only-subfolder")
    run = tmp_path / "run"
    with pytest.warns(UserWarning, match="one subfolder") as said:  # printed as "vaelab: warning: ..."
        code, _, err = _run(capsys, "train", "--dataset", str(parent), "--image-size", "16", "--epochs", "1",
                            "--hidden", "8", "--latent-dim", "2", "--out", str(run), "--quiet")
    assert code == 0, err
    assert [str(w.message) for w in said] == [
        f"all images in {parent} are in one subfolder (only-subfolder): treated as unlabelled"]
    # the train split's 54 images: enough for a 10-NN agreement, which one class would put at 100 %
    with pytest.warns(UserWarning, match="treated as unlabelled"):  # eval loads the folder again
        code, out, err = _run(capsys, "eval", str(run), "--split", "train", "--iw-samples", "2", "--json",
                              str(tmp_path / "e.json"), "--quiet")
    assert code == 0, err
    numbers = json.loads((tmp_path / "e.json").read_text())
    assert numbers["n_images"] == 54
    assert numbers["knn_agreement"] is None
    assert "n/a (needs labels" in out


# ------------------------------------------------------------------------------------------- the decoded cache
def test_cache_is_reused_and_rebuilt_on_change(tmp_path, own_cache):
    d = tmp_path / "f"
    d.mkdir()
    for i in range(5):
        Image.new("L", (4, 4), 10 * i).save(d / f"{i}.png")
    first = load_dataset(str(d))
    assert isinstance(first.train, np.memmap)
    (entry,) = list(cache.entries())
    built = entry.manifest["created"], (entry.path / "manifest.json").stat().st_mtime_ns
    again = load_dataset(str(d))
    (same,) = list(cache.entries())
    assert (same.manifest["created"], (same.path / "manifest.json").stat().st_mtime_ns) == built
    assert np.array_equal(first.train, again.train)
    manifest = same.manifest
    assert [f[0] for f in manifest["fingerprint"]["files"]] == [f"{i}.png" for i in range(5)]
    assert manifest["fingerprint"]["options"]["background"] == "white"
    # a changed file (same name), an added file, a removed file: each rebuilds the entry
    Image.new("L", (4, 4), 250).save(d / "0.png")
    os.utime(d / "0.png", ns=(time.time_ns(), time.time_ns() + 10**9))
    assert 250 in np.concatenate([load_dataset(str(d)).train, load_dataset(str(d)).test])
    Image.new("L", (4, 4), 123).save(d / "5.png")
    data = load_dataset(str(d))
    assert len(data.train) + len(data.test) == 6
    (d / "1.png").unlink()
    data = load_dataset(str(d))
    assert len(data.train) + len(data.test) == 5
    assert len(list(cache.entries())) == 1  # rebuilt in place
    load_dataset(str(d), background="black")  # other options: an entry of their own
    assert len(list(cache.entries())) == 2


def _entry_files(root: Path) -> dict[str, tuple[int, int, int]]:
    """Every file of the decoded cache as (inode, mtime in ns, bytes): a rebuilt entry is a new folder renamed
    into place, so any rewrite changes these."""
    return {str(f.relative_to(root)): (f.stat().st_ino, f.stat().st_mtime_ns, f.stat().st_size)
            for f in sorted(root.rglob("*")) if f.is_file()}


@pytest.fixture
def decodes(monkeypatch) -> list[str]:
    """The files the real decoder is called on, in this process (the decoder itself runs unchanged)."""
    calls: list[str] = []
    real = folders.decode

    def counted(path, opts):
        calls.append(str(path))  # list.append is atomic: the decoding pool's threads may call it at once
        return real(path, opts)

    monkeypatch.setattr(folders, "decode", counted)
    return calls


@pytest.mark.parametrize("opts", [{}, {"image_size": 16}, {"image_size": "16x12", "center_crop": 48}],
                         ids=["as-is", "image-size", "crop-and-size"])
def test_second_load_decodes_nothing_and_leaves_the_entry_as_it_was(emoji_dir, tmp_path, own_cache, decodes,
                                                                    capsys, opts):
    d = _copy(sorted(emoji_dir.glob("*.png"))[:40], tmp_path / "emoji")
    first = load_dataset(str(d), progress=True, **opts)
    assert len(decodes) == 40
    assert "vaelab: decoded 40 images" in capsys.readouterr().err
    built = _entry_files(own_cache)
    decodes.clear()
    for _ in range(2):  # a (limited) load, as `vaelab train --limit` makes, then a plain one
        again = load_dataset(str(d), limit=20, progress=True, **opts)
        assert decodes == []
        assert "decoded" not in capsys.readouterr().err
        assert _entry_files(own_cache) == built
        assert np.array_equal(again.test, first.test)
    # a file rewritten in place (same name and size, a new mtime) and an added file each decode the folder again
    os.utime(sorted(d.iterdir())[0], ns=(time.time_ns(), time.time_ns() + 10**9))
    load_dataset(str(d), **opts)
    assert len(decodes) == 40
    shutil.copy(sorted(emoji_dir.glob("*.png"))[40], d)
    decodes.clear()
    assert len(load_dataset(str(d), **opts).train) + len(load_dataset(str(d), **opts).test) == 41
    assert len(decodes) == 41  # once: the second of those two loads reused the rebuilt entry
    assert len(list(cache.entries())) == 1


def _train(*args: str) -> str:
    """`vaelab train` in a process of its own, as a user starts it; its stderr."""
    res = subprocess.run([*vaelab_cmd(), "train", *args], capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    return res.stderr


@pytest.mark.slow
def test_cli_trains_and_resumes_on_a_folder_decoded_once(emoji_dir, tmp_path, own_cache):
    d = _copy(sorted(emoji_dir.glob("*.png"))[:60], tmp_path / "emoji")
    tiny = ["--dataset", str(d), "--image-size", "16", "--epochs", "1", "--hidden", "8", "--latent-dim", "2"]
    err = _train(*tiny, "--out", str(tmp_path / "a"))
    assert err.count("vaelab: decoded 60 images") == 1, err
    built = _entry_files(own_cache)
    err = _train(*tiny, "--limit", "30", "--seed", "3", "--out", str(tmp_path / "b"))
    assert "decoded" not in err, err
    assert _entry_files(own_cache) == built
    err = _train("--resume", str(tmp_path / "a"), "--epochs", "2")
    assert "decoded" not in err, err
    assert _entry_files(own_cache) == built
    rows = (tmp_path / "a" / "metrics.jsonl").read_text().splitlines()
    assert {json.loads(r)["epoch"] for r in rows} >= {1, 2}  # the resumed run did train on the mapped entry


@pytest.mark.slow
def test_cache_build_killed_midway_leaves_nothing_trusted(emoji_dir, tmp_path, own_cache):
    code = f"from vaelab.data import load_dataset; load_dataset({str(emoji_dir)!r}, image_size=48)"
    proc = subprocess.Popen([sys.executable, "-c", code], env={**os.environ, "VAELAB_CACHE": str(own_cache)})
    deadline = time.time() + 120
    while time.time() < deadline and not list(own_cache.glob(".tmp-*/*.scratch")):
        time.sleep(0.05)
    assert list(own_cache.glob(".tmp-*")), "the build did not start"
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait(timeout=30)
    assert not [p for p in own_cache.iterdir() if not p.name.startswith(".")]  # no entry in place
    listed = list(cache.entries())
    assert listed
    assert all("incomplete" in cache.describe(e) for e in listed)
    data = load_dataset(str(emoji_dir), image_size=48)  # rebuilds, and removes the dead build's folder
    assert data.shape == (3, 48, 48)
    assert not list(own_cache.glob(".tmp-*"))


def test_failed_build_leaves_no_temporary_folder(tmp_path, own_cache):
    d = tmp_path / "f"
    d.mkdir()
    Image.new("L", (4, 4)).save(d / "a.png")
    Image.new("L", (5, 4)).save(d / "b.png")
    with pytest.raises(DataError, match="differ in size"):
        load_dataset(str(d))
    assert not own_cache.exists() or not list(own_cache.iterdir())


def _two_cache_entries(tmp_path) -> Path:
    """A folder of three 4x4 images decoded twice (as stored, and resized to 2x2): two cache entries."""
    d = tmp_path / "myimages"
    d.mkdir()
    for i in range(3):
        Image.new("RGB", (4, 4), (i, 0, 0)).save(d / f"{i}.png")
    load_dataset(str(d))
    load_dataset(str(d), image_size=2)
    return d


def test_cli_cache_ls_and_clear(tmp_path, own_cache, capsys):
    d = _two_cache_entries(tmp_path)
    code, out, _ = _run(capsys, "cache", "ls")
    assert code == 0
    assert out.count("myimages-") == 2
    assert str(d) in out
    assert "2 entries" in out
    assert "size 2x2" in out
    assert "[test 1x3x2x2, train 2x3x2x2]" in out
    name = out.split()[0]
    code, _, err = _run(capsys, "cache", "clear", "nope")
    assert code == 2
    assert "no cache entry named 'nope'" in err
    code, out, _ = _run(capsys, "cache", "clear", name)
    assert code == 0
    assert "removed 1 entry" in out
    assert len(list(own_cache.iterdir())) == 1
    code, out, _ = _run(capsys, "cache", "clear")
    assert code == 0
    assert "removed 1 entry" in out
    assert not list(own_cache.iterdir())


def test_cache_listing_and_clear_entries_are_what_the_cli_prints(tmp_path, own_cache, capsys):
    assert cache.listing() == f"0 entries, 0 B in {own_cache}"  # no cache folder yet
    _two_cache_entries(tmp_path)
    (own_cache / ".tmp-999999999-abandoned").mkdir()  # a build whose process is gone
    listed = list(cache.entries())
    lines = cache.listing().splitlines()
    assert lines[:-1] == [cache.describe(e) for e in listed]
    assert len(lines) == 4
    assert lines[0].startswith(".tmp-999999999-abandoned  0 B  incomplete")
    total = sum(f.stat().st_size for f in own_cache.rglob("*") if f.is_file())
    assert lines[-1] == f"3 entries, {cache.human_size(total)} in {own_cache}"
    assert vaelab.cache_list() == cache.listing()
    assert _run(capsys, "cache", "ls") == (0, cache.listing() + "\n", "")
    with pytest.raises(ConfigError, match=f"no cache entry named 'nope' in {own_cache}; `vaelab cache ls` lists"):
        cache.clear_entries("nope")
    assert len(list(cache.entries())) == 3  # nothing removed
    name = listed[1].name
    assert cache.clear_entries(name) == f"removed 1 entry from {own_cache}"
    assert [e.name for e in cache.entries()] == [listed[0].name, listed[2].name]
    assert vaelab.cache_clear() == f"removed 2 entries from {own_cache}"
    assert cache.listing() == f"0 entries, 0 B in {own_cache}"


@pytest.mark.parametrize(("args", "needle"), [
    (["--image-size", "0"], "--image-size must be a size such as 64 or 64x48"),
    (["--center-crop", "64xq"], "--center-crop must be a size such as 64 or 64x48"),
    (["--image-size", "32", "--dataset", "shapes"], "--image-size and --center-crop apply to image folders"),
])
def test_bad_size_flags_get_one_line(capsys, tmp_path, args, needle):
    code, _, err = _run(capsys, "train", "--out", str(tmp_path / "run"), "--quiet", *args)
    assert code == 2, err
    assert err.count("\n") == 1, err
    assert needle in err, err
