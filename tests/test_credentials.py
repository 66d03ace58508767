"""C2PA Content Credentials on the videos the commands write (`avatar/credentials.py`), read back by
`c2pa-python` and reported by `avatar verify`."""

import json
import subprocess
import sys

import pytest

from avatar import media
from avatar.credentials import SOURCE_TYPE, make_identity, read_credentials
from conftest import DATA, LRS2_CLIP, PORTRAIT, REPO

SPEECH = DATA / "speech/kleinlee__DH_live/audio0.wav"


def avatar(*args, env=None):
    return subprocess.run([sys.executable, "-m", "avatar.cli", *map(str, args)], cwd=REPO, capture_output=True, text=True,
                          timeout=600, env=env)


@pytest.fixture(scope="module")
def speech(tmp_path_factory):
    path = tmp_path_factory.mktemp("speech") / "speech.wav"
    media.write_audio(path, media.read_audio(SPEECH)[:16000 * 2])
    return path


@pytest.fixture(scope="module")
def animated(tmp_path_factory, speech):
    out = tmp_path_factory.mktemp("animated") / "talk.mp4"
    result = avatar("animate", "--image", PORTRAIT, "--audio", speech, "--output", out, "--quiet", "--no-drift")
    assert result.returncode == 0, result.stderr
    return out


def test_animate_writes_a_valid_manifest_that_verify_reports(animated):
    """c2pa.created, trainedAlgorithmicMedia, the engine and the model hashes, signed with this
    install's own key: valid, untrusted; `verify --json` prints JSON only, with it."""
    from avatar.pipeline import AvatarPipeline

    found = read_credentials(animated)
    assert found["present"] and found["validation_state"] == "Valid" and found["errors"] == [], found
    assert found["actions"] == [{"action": "c2pa.created", "digitalSourceType": SOURCE_TYPE}]
    assert found["local_untrusted_signer"] and found["credential_untrusted"]
    hashes = AvatarPipeline.from_pretrained().model_hashes
    assert found["models"]["models"] == {name: f"sha256:{digest}" for name, digest in hashes.items()}
    result = avatar("verify", animated, "--json", "--quiet")
    report = json.loads(result.stdout)  # nothing but the JSON on stdout
    assert result.returncode == 0 and report["c2pa"]["says_synthetic"] and report["synthetic"]
    human = avatar("verify", animated, "--quiet")
    assert "C2PA Content Credentials: Valid; c2pa.created (trainedAlgorithmicMedia)" in human.stdout


def test_one_changed_byte_breaks_the_signature(animated, tmp_path):
    data = bytearray(animated.read_bytes())
    data[len(data) // 2] ^= 1
    changed = tmp_path / "changed.mp4"
    changed.write_bytes(bytes(data))
    found = read_credentials(changed)
    assert found["validation_state"] == "Invalid" and any("mismatch" in e for e in found["errors"]), found
    result = avatar("verify", changed, "--json", "--quiet")
    assert json.loads(result.stdout)["c2pa"]["says_synthetic"] is False


def test_the_watermark_remains_when_the_credentials_are_stripped(animated, tmp_path):
    """Re-encoded (as a platform would: the manifest is gone), the file still says synthetic by its watermark."""
    clip = media.read_video(animated)
    stripped = tmp_path / "stripped.mp4"
    media.write_video(stripped, clip.frames, clip.fps, clip.audio, clip.sample_rate, crf=23)
    report = json.loads(avatar("verify", stripped, "--json", "--quiet").stdout)
    assert report["c2pa"]["present"] is False and report["watermark"]["found"] and report["synthetic"]


def test_dub_is_an_edit_of_its_source_video(tmp_path, speech):
    out = tmp_path / "dub.mov"
    result = avatar("dub", "--video", LRS2_CLIP, "--audio", speech, "--output", out, "--quiet", "--no-drift")
    assert result.returncode == 0, result.stderr
    found = read_credentials(out)
    assert found["validation_state"] == "Valid", found
    assert [a["action"] for a in found["actions"]] == ["c2pa.opened", "c2pa.edited"]
    assert found["actions"][1]["digitalSourceType"] == SOURCE_TYPE and found["ingredients"] == [LRS2_CLIP.name]


def test_signed_with_the_users_certificate(tmp_path, speech):
    bundle = make_identity("Test Newsroom video desk")
    split = bundle.index(b"-----BEGIN CERTIFICATE-----")
    (tmp_path / "chain.pem").write_bytes(bundle[split:])
    (tmp_path / "key.pem").write_bytes(bundle[:split])
    out = tmp_path / "signed.mp4"
    result = avatar("animate", "--image", PORTRAIT, "--audio", speech, "--output", out, "--quiet", "--no-drift",
                    "--c2pa.cert", tmp_path / "chain.pem", "--c2pa.key", tmp_path / "key.pem")
    assert result.returncode == 0, result.stderr
    found = read_credentials(out)
    assert found["validation_state"] == "Valid" and found["signed_by"] == "Test Newsroom video desk"
    assert not found["local_untrusted_signer"] and found["credential_untrusted"]  # its CA is nobody's trust anchor here
    assert "signed by Test Newsroom video desk (credential untrusted here)" in avatar("verify", out, "--quiet").stdout


def test_bad_signing_setups_get_one_line(tmp_path, speech):
    (tmp_path / "not_a_key.pem").write_text("hello")
    bundle = make_identity()
    (tmp_path / "chain.pem").write_bytes(bundle[bundle.index(b"-----BEGIN CERTIFICATE-----"):])
    out = tmp_path / "out.mp4"
    cases = [
        (["--c2pa.cert", tmp_path / "chain.pem"], "needs both a certificate chain and its key"),
        (["--c2pa.cert", tmp_path / "chain.pem", "--c2pa.key", tmp_path / "not_a_key.pem"], "not an unencrypted PEM private key"),
        (["--c2pa.cert", tmp_path / "missing.pem", "--c2pa.key", tmp_path / "not_a_key.pem"], "no such file"),
        (["--output", tmp_path / "out.mkv"], "cannot carry C2PA Content Credentials; write .mp4 or .mov, or give --no-c2pa.enabled"),
    ]
    for extra, words in cases:
        output = [] if "--output" in extra else ["--output", out]
        result = avatar("animate", "--image", PORTRAIT, "--audio", speech, *output, *extra, "--quiet")
        assert result.returncode == 2 and words in result.stderr and result.stderr.count("\n") == 1, (extra, result.stderr)
        assert not any(tmp_path.glob("out.*"))


def test_a_source_c2pa_cannot_read_is_named_and_hashed_instead(tmp_path, speech):
    """A GRID clip (MPEG-PS) dubbed: C2PA reads no MPEG-PS ingredient, so the manifest says
    c2pa.created and records the source's name and sha256 in the models assertion."""
    from avatar.provenance import file_sha256
    from conftest import GRID_CLIP

    out = tmp_path / "dub.mp4"
    result = avatar("dub", "--video", GRID_CLIP, "--audio", speech, "--output", out, "--quiet", "--no-drift")
    assert result.returncode == 0, result.stderr
    found = read_credentials(out)
    assert found["validation_state"] == "Valid" and found["ingredients"] == []
    assert found["actions"] == [{"action": "c2pa.created", "digitalSourceType": SOURCE_TYPE}]
    assert found["models"]["source_video"] == {"name": GRID_CLIP.name, "sha256": file_sha256(GRID_CLIP)}
