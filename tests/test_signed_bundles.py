"""Signed bundles (bundle_format/signature.py) and bundles that cannot reach outside their folder
(bundle_format/bundle.py): the library, `edgellm sign/keygen/info --verify`, and `edgellm serve` refusing at start."""

from __future__ import annotations

import hashlib
import os
import shutil
import stat
import subprocess
import sys
from pathlib import Path

import onnx
import pytest
import yaml

from bundle_format.bundle import BundleError, load_bundle
from bundle_format.onnx_external import MalformedGraph, external_data_locations
from bundle_format.signature import (SIGNATURE_NAME, KeyFileError, check_signatures, generate_key_pair,
                                     load_private_key, load_trusted_keys, read_signatures, sign_bundle,
                                     verify_trusted_bundle)
from edgellm.cli import main

EDGELLM = [sys.executable, "-m", "edgellm"]


@pytest.fixture(scope="module")
def keys(tmp_path_factory) -> dict[str, tuple[Path, Path]]:
    """Three key pairs: (private, public) for "a", "b" and "stranger"."""
    folder = tmp_path_factory.mktemp("keys")
    return {name: generate_key_pair(folder / f"{name}.pem")[:2] for name in ("a", "b", "stranger")}


@pytest.fixture
def bundle(tiny_bundle, tmp_path) -> Path:
    """A private copy of the tiny model's bundle, unsigned."""
    return Path(shutil.copytree(tiny_bundle, tmp_path / "b"))


def sign(folder: Path, private: Path, signer: str = "") -> None:
    sign_bundle(folder, load_private_key(private), signer)


def trusted(*publics: Path) -> dict:
    return load_trusted_keys(list(publics))


def verify(folder: Path, *publics: Path):
    return verify_trusted_bundle(load_bundle(folder, verify=False), trusted(*publics))


def rewrite_manifest(folder: Path, change) -> None:
    """Apply change(manifest) and write the manifest back (its checksums are not recomputed)."""
    manifest = yaml.safe_load((folder / "manifest.yaml").read_text())
    change(manifest)
    (folder / "manifest.yaml").write_text(yaml.safe_dump(manifest, sort_keys=False))


def rechecksum(folder: Path, name: str) -> None:
    """Make the manifest's sha256 of `name` match the file again (a consistent but crafted bundle)."""
    digest = hashlib.sha256((folder / name).read_bytes()).hexdigest()
    rewrite_manifest(folder, lambda m: m["files"].__setitem__(name, digest))


def point_graph_at(folder: Path, location: str) -> str:
    """Rewrite the graph so its first external tensor reads `location`; returns that tensor's name."""
    model = onnx.load(str(folder / "model.onnx"), load_external_data=False)
    tensor = next(t for t in model.graph.initializer if t.external_data)
    for entry in tensor.external_data:
        if entry.key == "location":
            entry.value = location
    (folder / "model.onnx").write_bytes(model.SerializeToString())
    rechecksum(folder, "model.onnx")
    return tensor.name


# -- signatures -------------------------------------------------------------------------------------------------------

def test_sign_and_verify_round_trip(bundle, keys):
    sign(bundle, keys["a"][0], "release-ci")
    check = verify(bundle, keys["a"][1])
    assert check.valid and check.trusted and check.signature.signer == "release-ci"
    assert check.signature.key_id == hashlib.sha256(bytes(check.signature.public_key)).hexdigest()


def test_signer_label_is_kept_printable(bundle, keys):
    sign(bundle, keys["a"][0], "ci\x1b[2Jrelease")  # a terminal escape in the unsigned label
    assert read_signatures(bundle)[0].signer == "ci?[2Jrelease"


def test_tampered_manifest_breaks_the_signature(bundle, keys):
    sign(bundle, keys["a"][0])
    rewrite_manifest(bundle, lambda m: m.__setitem__("precision", "int4"))  # checksums untouched: only the signature sees it
    with pytest.raises(BundleError, match="no valid signature by a trusted key.*INVALID"):
        verify(bundle, keys["a"][1])


def test_tampered_file_under_a_valid_signature_is_named(bundle, keys):
    sign(bundle, keys["a"][0])
    data = bundle / "model.onnx.data"
    raw = bytearray(data.read_bytes())
    raw[len(raw) // 2] ^= 1
    data.write_bytes(bytes(raw))
    assert check_signatures(load_bundle(bundle, verify=False), trusted(keys["a"][1]))[0].valid  # the manifest is intact
    with pytest.raises(BundleError, match=r"model\.onnx\.data: checksum mismatch"):
        verify(bundle, keys["a"][1])


def test_unknown_key_is_refused_naming_it(bundle, keys):
    sign(bundle, keys["stranger"][0])
    stranger_id = read_signatures(bundle)[0].key_id
    with pytest.raises(BundleError, match=f"key {stranger_id}: valid, not among the trusted keys"):
        verify(bundle, keys["a"][1], keys["b"][1])


def test_a_trusted_key_id_with_another_public_key_is_not_trusted(bundle, keys):
    """Trust is the whole key: a signature file claiming a trusted key's id with its own key does not pass."""
    sign(bundle, keys["stranger"][0])
    sig_file = bundle / SIGNATURE_NAME
    a_id = next(iter(trusted(keys["a"][1])))
    stranger_id = read_signatures(bundle)[0].key_id
    sig_file.write_text(sig_file.read_text().replace(stranger_id, a_id))
    with pytest.raises(BundleError, match="key_id does not match its public key"):
        verify(bundle, keys["a"][1])


def test_rotation_either_trusted_key_verifies(bundle, keys):
    sign(bundle, keys["a"][0])
    assert verify(bundle, keys["a"][1], keys["b"][1]).signature.key_id == next(iter(trusted(keys["a"][1])))
    sign(bundle, keys["b"][0])  # the new key signs too: both signatures are kept
    assert len(read_signatures(bundle)) == 2
    assert verify(bundle, keys["b"][1]).trusted  # a device that trusts only the new key
    assert verify(bundle, keys["a"][1]).trusted  # ... or only the old one


def test_signing_again_drops_signatures_of_an_older_manifest(bundle, keys):
    sign(bundle, keys["a"][0])
    rewrite_manifest(bundle, lambda m: m.__setitem__("precision", "int4"))
    sign(bundle, keys["b"][0])
    assert [s.key_id for s in read_signatures(bundle)] == list(trusted(keys["b"][1]))


def test_unsigned_bundle_is_refused_only_when_trust_is_configured(bundle, keys):
    load_bundle(bundle)  # no trust: as before, checksums only
    with pytest.raises(BundleError, match="unsigned"):
        verify(bundle, keys["a"][1])


def test_signed_bundle_holds_only_its_signed_files(bundle, keys):
    sign(bundle, keys["a"][0])
    (bundle / "chat_template.jinja").write_text("{{ 'planted' }}")  # the tokenizer would read it
    with pytest.raises(BundleError, match=r"chat_template\.jinja: not listed in the signed manifest"):
        verify(bundle, keys["a"][1])


def test_signed_bundle_writable_by_others_is_refused(bundle, keys):
    sign(bundle, keys["a"][0])
    data = bundle / "model.onnx.data"
    data.chmod(data.stat().st_mode | stat.S_IWOTH)
    with pytest.raises(BundleError, match=r"model\.onnx\.data: writable by others"):
        verify(bundle, keys["a"][1])


def test_key_files_are_checked(tmp_path, keys):
    private, public, _ = generate_key_pair(tmp_path / "k.pem")
    assert stat.S_IMODE(private.stat().st_mode) == 0o600
    with pytest.raises(FileExistsError):
        generate_key_pair(tmp_path / "k.pem")
    with pytest.raises(KeyFileError, match="that is a private key"):
        load_trusted_keys([private])
    with pytest.raises(KeyFileError, match="not a PEM private key"):
        load_private_key(public)
    with pytest.raises(KeyFileError, match="cannot read"):
        load_trusted_keys([tmp_path / "missing.pub"])


@pytest.mark.skipif(shutil.which("openssl") is None, reason="needs the openssl command")
def test_openssl_keys_sign_and_verify(bundle, tmp_path):
    subprocess.run(["openssl", "genpkey", "-algorithm", "ed25519", "-out", str(tmp_path / "o.pem")], check=True)
    subprocess.run(["openssl", "pkey", "-in", str(tmp_path / "o.pem"), "-pubout", "-out", str(tmp_path / "o.pub")], check=True)
    sign(bundle, tmp_path / "o.pem")
    assert verify(bundle, tmp_path / "o.pub").trusted


# -- confinement ------------------------------------------------------------------------------------------------------

@pytest.fixture
def outside(tmp_path, tiny_bundle) -> Path:
    """A real file outside the bundle with the graph's weights: an escape would load without complaint."""
    return Path(shutil.copy(tiny_bundle / "model.onnx.data", tmp_path / "outside.data"))


@pytest.mark.parametrize("how", ["relative", "absolute", "symlink"])
def test_graph_external_data_outside_the_bundle_is_refused(bundle, outside, how):
    if how == "symlink":  # in a subfolder: past the check of the folder's own entries, caught by realpath
        (bundle / "sub").mkdir()
        (bundle / "sub" / "weights").symlink_to(outside)
        location = "sub/weights"
    else:
        location = "../outside.data" if how == "relative" else str(outside)
    tensor = point_graph_at(bundle, location)
    for verify_checksums in (False, True):  # the daemon's fast start, and `info --verify`
        with pytest.raises(BundleError, match=f"tensor '{tensor}' stores its data in '{location}'"):
            load_bundle(bundle, verify=verify_checksums)


def test_graph_external_data_not_listed_is_refused(bundle):
    shutil.copy(bundle / "model.onnx.data", bundle / "unlisted.data")
    point_graph_at(bundle, "unlisted.data")
    with pytest.raises(BundleError, match="unlisted.data', which is not one of the bundle's files"):
        load_bundle(bundle, verify=False)


@pytest.mark.parametrize("name", ["../x", "/etc/hostname", "link"])
def test_manifest_file_outside_the_bundle_is_refused(bundle, tmp_path, name):
    (tmp_path / "x").write_text("outside")
    (bundle / "link").symlink_to(tmp_path / "x")
    rewrite_manifest(bundle, lambda m: m["files"].__setitem__(name, "0" * 64))
    with pytest.raises(BundleError, match=f"files entry '{name}'"):
        load_bundle(bundle, verify=False)


def test_unlisted_link_out_of_the_bundle_is_refused(bundle, tmp_path):
    """The tokenizer reads chat_template.jinja when it is there, listed or not: it must not lead outside either."""
    (tmp_path / "secret").write_text("outside")
    (bundle / "chat_template.jinja").symlink_to(tmp_path / "secret")
    with pytest.raises(BundleError, match=r"chat_template\.jinja: a symbolic link: resolves to .*secret, outside"):
        load_bundle(bundle, verify=False)


def test_manifest_section_naming_an_unlisted_file_is_refused(bundle):
    rewrite_manifest(bundle, lambda m: m["graph"].__setitem__("file", "../model.onnx"))
    with pytest.raises(BundleError, match="graph.file '../model.onnx' is not one of the bundle's files"):
        load_bundle(bundle, verify=False)


def test_external_data_reader_matches_onnx(tiny_bundle):
    """The daemon's reader (no onnx package) finds what onnx finds, subgraph constants included."""
    data = (tiny_bundle / "model.onnx").read_bytes()
    model = onnx.load_from_string(data)
    want = [(t.name, e.value) for t in model.graph.initializer for e in t.external_data if e.key == "location"]
    assert want and external_data_locations(data) == want
    const = onnx.TensorProto(name="c", data_type=onnx.TensorProto.FLOAT, dims=[1], data_location=onnx.TensorProto.EXTERNAL)
    const.external_data.add(key="location", value="../c.bin")
    branch = onnx.helper.make_graph([onnx.helper.make_node("Constant", [], ["y"], value=const)], "b", [],
                                    [onnx.helper.make_tensor_value_info("y", onnx.TensorProto.FLOAT, [1])])
    graph = onnx.helper.make_graph([onnx.helper.make_node("If", ["p"], ["z"], then_branch=branch, else_branch=branch)], "g",
                                   [onnx.helper.make_tensor_value_info("p", onnx.TensorProto.BOOL, [])],
                                   [onnx.helper.make_tensor_value_info("z", onnx.TensorProto.FLOAT, [1])])
    assert external_data_locations(onnx.helper.make_model(graph).SerializeToString()) == [("c", "../c.bin")] * 2
    with pytest.raises(MalformedGraph):
        external_data_locations(data[:-3])


# -- the daemon at start ----------------------------------------------------------------------------------------------

def serve_refusal(folder: Path, config: dict, tmp_path: Path) -> subprocess.CompletedProcess:
    """`edgellm serve` on `folder`, expected to refuse at start."""
    (tmp_path / "c.yaml").write_text(yaml.safe_dump({"listen": {"unix": str(tmp_path / "s.sock")}, **config}))
    done = subprocess.run([*EDGELLM, "serve", "--bundle", str(folder), "--config", str(tmp_path / "c.yaml")],
                          capture_output=True, text=True, timeout=120)
    assert "Traceback" not in done.stderr and "ready on" not in done.stdout
    return done


@pytest.mark.parametrize("case", ["unsigned", "manifest-changed", "file-changed", "stranger", "graph-relative",
                                  "graph-absolute", "manifest-escape"])
def test_daemon_refuses_at_start(bundle, keys, outside, tmp_path, case):
    trust = {"trust": {"public_keys": [str(keys["a"][1]), str(keys["b"][1])]}}
    needle = {"unsigned": "unsigned", "manifest-changed": "INVALID", "file-changed": "tokenizer.json: checksum mismatch",
              "stranger": "not among the trusted keys", "graph-relative": "'../outside.data'",
              "graph-absolute": f"'{outside}'", "manifest-escape": "files entry '../x'"}[case]
    if case == "graph-relative":
        point_graph_at(bundle, "../outside.data")
    elif case == "graph-absolute":
        point_graph_at(bundle, str(outside))
    elif case == "manifest-escape":
        rewrite_manifest(bundle, lambda m: m["files"].__setitem__("../x", "0" * 64))
        (bundle.parent / "x").write_text("outside")
    if case != "unsigned":
        sign(bundle, keys["stranger" if case == "stranger" else "b"][0])
    if case == "manifest-changed":
        rewrite_manifest(bundle, lambda m: m.__setitem__("precision", "int4"))
    elif case == "file-changed":
        (bundle / "tokenizer.json").write_text((bundle / "tokenizer.json").read_text() + " ")
    # Confinement holds with or without trust: those bundles are refused by a daemon that requires no signature.
    done = serve_refusal(bundle, {} if case.startswith(("graph", "manifest-escape")) else trust, tmp_path)
    assert done.returncode == 1 and "refusing to start" in done.stderr and needle in done.stderr, done.stderr


def test_daemon_names_an_unusable_trusted_key(bundle, keys, tmp_path):
    done = serve_refusal(bundle, {"trust": {"public_keys": [str(keys["a"][0])]}}, tmp_path)
    assert done.returncode == 2 and f"trust.public_keys: {keys['a'][0]}" in done.stderr, done.stderr


def test_daemon_checks_the_signature_before_loading_the_model(bundle, keys, monkeypatch):
    """With trust configured nothing of the bundle is loaded until it is verified: a bad bundle never reaches ONNX Runtime."""
    import asyncio

    import daemon.backends
    from daemon.config import parse_config
    from daemon.lifecycle import run_daemon

    loaded = []
    monkeypatch.setattr(daemon.backends, "create_backend", lambda *a, **k: loaded.append(a) or 1 / 0)
    config = parse_config({"listen": {"unix": str(bundle.parent / "s.sock")}, "trust": {"public_keys": [str(keys["a"][1])]}})
    with pytest.raises(BundleError, match="unsigned"):
        asyncio.run(run_daemon(config, load_bundle(bundle, verify=False)))
    assert loaded == []


# -- the commands -----------------------------------------------------------------------------------------------------

def test_keygen_build_sign_info_verify_serve(tiny_checkpoint, tmp_path):
    """The whole flow through the `edgellm` command: keys, a signed build, verification, a daemon that requires it."""
    def run(*args: str) -> subprocess.CompletedProcess:
        return subprocess.run([*EDGELLM, *args], capture_output=True, text=True, timeout=300)

    assert run("keygen", str(tmp_path / "k.pem")).returncode == 0
    assert run("keygen", str(tmp_path / "k.pem")).returncode == 1  # never over an existing key
    built = run("build", str(tiny_checkpoint), "-o", str(tmp_path / "b"), "--context-length", "32",
                "--sign", str(tmp_path / "k.pem"), "--signer", "ci")
    assert built.returncode == 0, built.stderr
    assert (tmp_path / "b" / SIGNATURE_NAME).is_file()
    info = run("info", str(tmp_path / "b"), "--verify", "--trust", str(tmp_path / "k.pem.pub"))
    assert info.returncode == 0 and "(ci): valid, trusted" in info.stdout and "checksums: ok" in info.stdout, info.stderr
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"listen": {"unix": str(tmp_path / "s.sock")},
                                      "trust": {"public_keys": [str(tmp_path / "k.pem.pub")]}}))
    from test_cli import Served

    served = Served("--bundle", str(tmp_path / "b"), "--config", str(config), log=tmp_path / "serve.log")
    try:
        assert served.wait_ready(120), (tmp_path / "serve.log").read_text()
    finally:
        assert served.stop() == 0
    assert "signed by trusted key" in (tmp_path / "serve.log").read_text()


def test_sign_command(bundle, keys, tmp_path, capsys):
    assert main(["sign", str(bundle), "--key", str(keys["a"][0]), "--signer", "me"]) == 0
    assert "signed" in capsys.readouterr().out
    assert main(["sign", str(bundle), "--key", str(keys["a"][1])]) == 2  # a public key cannot sign
    assert "not a PEM private key" in capsys.readouterr().err
    (bundle / "tokenizer.json").write_text("{}")
    assert main(["sign", str(bundle), "--key", str(keys["a"][0])]) == 1  # a signature vouches for the checksums
    assert "refusing to sign" in capsys.readouterr().err


def test_info_verify_exit_codes(bundle, keys, tmp_path, capsys):
    def info(*args: str) -> tuple[int, str, str]:
        code = main(["info", str(bundle), "--verify", *args])
        out = capsys.readouterr()
        return code, out.out, out.err

    assert info()[0] == 0  # unsigned, no trust asked: checksums only, as before
    code, _, err = info("--trust", str(keys["a"][1]))
    assert code == 1 and "unsigned" in err
    sign(bundle, keys["a"][0], "me")
    code, out, _ = info("--trust", str(keys["b"][1]), str(keys["a"][1]))
    assert code == 0 and "(me): valid, trusted" in out and "checksums: ok" in out
    config = tmp_path / "c.yaml"
    config.write_text(yaml.safe_dump({"trust": {"public_keys": [str(keys["b"][1])]}}))
    code, out, err = info("--config", str(config))  # the config's keys: signed, but not by a key it trusts
    assert code == 1 and "not among the trusted keys" in out + err
    (bundle / "tokenizer_config.json").write_text("{}")
    code, _, err = info("--trust", str(keys["a"][1]))
    assert code == 1 and "tokenizer_config.json: checksum mismatch" in err
    code, _, err = info()  # without trust too
    assert code == 1 and "tokenizer_config.json: checksum mismatch" in err


def test_info_verify_refuses_a_bundle_reaching_outside(bundle, outside, capsys):
    point_graph_at(bundle, "../outside.data")
    assert main(["info", str(bundle), "--verify"]) == 1
    assert "'../outside.data'" in capsys.readouterr().err


def test_compile_style_update_drops_the_stale_signature(bundle, keys):
    """A manifest changed on the device (edgellm compile) no longer matches its signature: it is removed, not left stale."""
    from build_engine.bundle_writer import update_bundle

    sign(bundle, keys["a"][0])
    update_bundle(bundle, {"extra.bin": b"engine"}, {"engine": {"file": "extra.bin"}})
    assert not (bundle / SIGNATURE_NAME).exists()
    load_bundle(bundle)


def test_build_refuses_an_unusable_signing_key_before_building(tiny_checkpoint, tmp_path):
    from build_engine.build import build_bundle

    (tmp_path / "bad.pem").write_text("not a key")
    with pytest.raises(KeyFileError):
        build_bundle(tiny_checkpoint, tmp_path / "b", signing_key=tmp_path / "bad.pem")
    assert not (tmp_path / "b").exists()


def test_a_current_link_is_resolved_once(bundle, tmp_path):
    """The over-the-air layout: `current` -> a bundle folder. Swapping the link after the load starts does not
    mix two bundles' files: the loaded bundle names the folder itself."""
    other = Path(shutil.copytree(bundle, tmp_path / "other"))
    (tmp_path / "current").symlink_to(bundle)
    loaded = load_bundle(tmp_path / "current", verify=False)
    (tmp_path / "next").symlink_to(other)
    os.rename(tmp_path / "next", tmp_path / "current")  # the atomic swap of the update flow
    assert loaded.path == bundle.resolve() and loaded.graph_path.parent == bundle.resolve()
