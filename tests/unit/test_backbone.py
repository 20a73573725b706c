import shutil

import pytest

from mtl_build.backbone import BackboneError, default_backbone_path, sha256_file, verify_backbone
from mtl_build.config import BackboneConfig

PINNED = {
    "model.safetensors": "53aa51172d142c89d9012cce15ae4d6cc0ca6895895114379cacb4fab128d9db",
    "tokenizer.json": "be50c3628f2bf5bb5e3a7f17b1f74611b2561a3a27eeab05e5aa30f411572037",
    "config.json": "953f9c0d463486b10a6871cc2fd59f223b2c70184f49815e7efbcab5d8908b41",
}


@pytest.fixture
def backbone_copy(tmp_path):
    source = default_backbone_path()
    for name in ("tokenizer.json", "config.json"):
        shutil.copy(source / name, tmp_path / name)
    (tmp_path / "model.safetensors").symlink_to(source / "model.safetensors")
    return tmp_path


def test_packaged_backbone_matches_pinned_digests():
    assert verify_backbone(BackboneConfig(sha256=PINNED)) == default_backbone_path()


def test_altered_file_is_rejected_with_both_digests(backbone_copy):
    config = backbone_copy / "config.json"
    config.write_text(config.read_text().replace('"num_hidden_layers": 6', '"num_hidden_layers": 5'))
    with pytest.raises(BackboneError) as error:
        verify_backbone(BackboneConfig(path=backbone_copy, sha256=PINNED))
    message = str(error.value)
    assert "config.json" in message and sha256_file(config) in message and PINNED["config.json"] in message


def test_missing_file_and_hub_id_are_rejected(backbone_copy):
    (backbone_copy / "tokenizer.json").unlink()
    with pytest.raises(BackboneError, match="tokenizer.json is missing"):
        verify_backbone(BackboneConfig(path=backbone_copy, sha256=PINNED))
    with pytest.raises(BackboneError, match="a hub id is not accepted"):
        verify_backbone(BackboneConfig(path="sentence-transformers/all-MiniLM-L6-v2", sha256=PINNED))
