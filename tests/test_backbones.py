from pathlib import Path

import pytest
import torch

from geoindex.backbones import create_backbone, list_backbones
from geoindex.errors import GeoindexError, WeightsNotFound

DIMS = {"densenet": 1024, "resnet18": 512, "cnn": 512, "clip": 512, "effnet": 1280, "effnet-lite1": 1280,
        "effnet-lite2": 1280, "effnet-duo": 2560}


def test_registry_lists_every_backbone():
    assert set(list_backbones()) == set(DIMS)
    with pytest.raises(GeoindexError, match="unknown backbone"):
        create_backbone("vgg")


@pytest.mark.parametrize("name", sorted(DIMS))
def test_each_backbone_embeds_to_its_declared_size(name):
    size = 224 if name == "clip" else 64
    bb = create_backbone(name, weights="none", image_size=size)
    assert bb.embed_dim == DIMS[name] and bb.weights.source == "random"
    with torch.inference_mode():
        out = bb.model(torch.randn(2, 3, size, size))
    assert out.shape == (2, DIMS[name])


def test_random_weights_are_reproducible():
    a = create_backbone("resnet18", weights="none", image_size=64)
    b = create_backbone("resnet18", weights="none", image_size=64)
    for (k, va), vb in zip(a.model.state_dict().items(), b.model.state_dict().values()):
        assert torch.equal(va, vb), k


def test_missing_pretrained_weights_name_the_file(monkeypatch, tmp_path):
    monkeypatch.setattr(torch.hub, "get_dir", lambda: str(tmp_path))
    with pytest.raises(WeightsNotFound, match=r"densenet121-a639ec97\.pth.*--weights"):
        create_backbone("densenet")
    with pytest.raises(WeightsNotFound, match="not found"):
        create_backbone("resnet18", weights=tmp_path / "missing.pth")


def test_weights_file_round_trip(tmp_path):
    source = create_backbone("resnet18", weights="none", image_size=64)
    with torch.no_grad():
        for p in source.model.parameters():
            p.add_(0.01)
    path = tmp_path / "r18.pth"
    torch.save(source.model.state_dict(), path)
    loaded = create_backbone("resnet18", weights=path, image_size=64)
    assert loaded.weights.source == "file" and len(loaded.weights.sha256) == 64
    x = torch.randn(1, 3, 64, 64)
    with torch.inference_mode():
        torch.testing.assert_close(loaded.model(x), source.model.eval()(x))
    wrong = tmp_path / "cnn.pth"
    torch.save(create_backbone("cnn", weights="none").model.state_dict(), wrong)
    with pytest.raises(GeoindexError, match="does not fit"):
        create_backbone("resnet18", weights=wrong)


def test_one_backbone_table_feeds_the_registry_and_the_listing():
    # One table: every entry has a builder, the registry's spec is the table's entry, and the CLI's torch-free
    # listing reads the same entries.
    from geoindex.backbones import backbone_spec, list_backbones
    from geoindex.catalog import BACKBONE_SPECS, BACKBONES
    assert list_backbones() == sorted(BACKBONE_SPECS) == sorted(BACKBONES)
    for name in BACKBONE_SPECS:
        assert backbone_spec(name).info is BACKBONE_SPECS[name]
        assert BACKBONES[name] == backbone_spec(name).description


def test_capabilities_are_declared_on_the_spec_not_read_from_the_name():
    from geoindex.catalog import BACKBONE_SPECS
    assert {n for n, s in BACKBONE_SPECS.items() if s.zero_shot} == {"clip"}
    assert {n for n, s in BACKBONE_SPECS.items() if s.tail_adaptable} == {"effnet", "effnet-lite1", "effnet-lite2",
                                                                         "effnet-duo"}
    assert {n for n, s in BACKBONE_SPECS.items() if s.offline_weights} >= {"effnet", "cnn"}
    assert not BACKBONE_SPECS["densenet"].offline_weights
    import geoindex
    source = "\n".join(p.read_text() for p in Path(geoindex.__file__).parent.rglob("*.py"))
    for by_name in ('== "clip"', '!= "clip"', 'startswith("effnet")', "startswith('effnet')", '== "cnn"'):
        assert by_name not in source, f"a capability tested by name: {by_name}"


def test_a_new_backbone_is_one_entry(monkeypatch):
    # Registering a backbone defined outside the table adds its one entry, which the listing then shows.
    import geoindex.backbones as backbones
    from geoindex import catalog
    monkeypatch.setattr(catalog, "BACKBONE_SPECS", dict(catalog.BACKBONE_SPECS))
    monkeypatch.setattr(backbones, "BACKBONE_SPECS", catalog.BACKBONE_SPECS)
    monkeypatch.setattr(backbones, "_BUILDERS", dict(backbones._BUILDERS))
    backbones.register_backbone("tiny", "a tiny test backbone", 64, tail_adaptable=True)(lambda weights, image_size: None)
    assert "tiny" in backbones.list_backbones() and backbones.backbone_spec("tiny").default_image_size == 64
    assert catalog.BACKBONE_SPECS["tiny"].tail_adaptable and not catalog.BACKBONE_SPECS["tiny"].zero_shot


def test_listing_commands_do_not_import_torch(tmp_path):
    import subprocess
    import sys
    code = ("import sys; from click.testing import CliRunner; from geoindex.cli import main; "
            f"r = CliRunner().invoke(main, ['indexes', '--index-dir', {str(tmp_path)!r}]); "
            "r2 = CliRunner().invoke(main, ['backbones']); "
            "assert r.exit_code == 0 and r2.exit_code == 0, (r.output, r2.output); "
            "print(sorted(m for m in ('torch', 'faiss', 'h5py', 'sklearn', 'pandas') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"


def test_effnet_duo_is_lite0_and_lite2_side_by_side():
    # Each half is its member's own (L2-normalised) features: Lite2 at 260 px, Lite0 at 224 px.
    duo = create_backbone("effnet-duo")
    lite0, lite2 = create_backbone("effnet"), create_backbone("effnet-lite2")
    assert duo.weights.source == "pretrained" and duo.image_size == 260 and duo.embed_dim == 2560
    x = torch.randn(2, 3, 260, 260)
    with torch.inference_mode():
        both = duo.model(x)
        small = torch.nn.functional.interpolate(x, size=(224, 224), mode="bicubic", antialias=True, align_corners=False)
        first = torch.nn.functional.normalize(lite0.model(small), dim=1)
        second = torch.nn.functional.normalize(lite2.model(x), dim=1)
    torch.testing.assert_close(both, torch.cat([first, second], dim=1), atol=1e-5, rtol=1e-4)
