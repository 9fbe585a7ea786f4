import os
from pathlib import Path

import pytest
from jobbroker.broker.errors import ConfigError, IntegrityError
from jobbroker.broker.protocol import auth
from jobbroker.broker.protocol.credentials import (
    default_secret_path,
    ensure_secret_file,
    load_secret_file,
    resolve_secret,
)

SECRET = b"k" * 32


def test_proofs_depend_on_role_secret_and_both_nonces() -> None:
    a, b = auth.new_nonce(), auth.new_nonce()
    assert a != b and len(a) == auth.NONCE_SIZE
    server = auth.server_proof(SECRET, "default", a, b)
    assert server != auth.client_proof(SECRET, "default", a, b)  # a proof cannot be reflected
    assert server != auth.server_proof(b"j" * 32, "default", a, b)
    assert server != auth.server_proof(SECRET, "default", b, a)
    assert server != auth.server_proof(SECRET, "other", a, b)  # the name is covered
    assert auth.proof_matches(server, auth.server_proof(SECRET, "default", a, b))


@pytest.mark.parametrize("received", [b"", b"x" * 31, "text", None, b"x" * 33])
def test_proof_of_wrong_type_or_length_never_matches(received: object) -> None:
    assert not auth.proof_matches(b"x" * 32, received)


def test_session_keys_differ_per_direction_and_connection() -> None:
    a, b = auth.new_nonce(), auth.new_nonce()
    to_broker, to_client = auth.derive_session_keys(SECRET, "default", a, b)
    assert to_broker != to_client
    assert auth.derive_session_keys(SECRET, "default", a, auth.new_nonce())[0] != to_broker


def test_frame_macs_detect_tampering_replay_and_reordering() -> None:
    key = b"q" * 32
    signer = auth.FrameSigner(key)
    first, second = signer.sign(b"one"), signer.sign(b"two")

    assert auth.FrameVerifier(key).verify(first) == b"one"

    tampered = bytearray(first)
    tampered[0] ^= 1
    with pytest.raises(IntegrityError):
        auth.FrameVerifier(key).verify(bytes(tampered))

    verifier = auth.FrameVerifier(key)
    verifier.verify(first)
    with pytest.raises(IntegrityError):
        verifier.verify(first)  # replayed

    with pytest.raises(IntegrityError):
        auth.FrameVerifier(key).verify(second)  # reordered: second arrives first

    with pytest.raises(IntegrityError):
        auth.FrameVerifier(key).verify(b"short")


def test_secret_resolution_order(tmp_path: Path) -> None:
    environ = {"XDG_DATA_HOME": str(tmp_path / "data")}
    with pytest.raises(ConfigError, match="no secret"):
        resolve_secret(environ=environ)

    default, path, created = ensure_secret_file(default_secret_path(environ))
    assert created and path == tmp_path / "data" / "jobbroker" / "secret"
    assert os.stat(path).st_mode & 0o777 == 0o600
    assert resolve_secret(environ=environ) == default

    environ["JOBBROKER_SECRET"] = "e" * 20
    assert resolve_secret(environ=environ) == b"e" * 20

    secret_file = tmp_path / "file"
    secret_file.write_bytes(b"f" * 20 + b"\n")
    secret_file.chmod(0o600)
    environ["JOBBROKER_SECRET_FILE"] = str(secret_file)
    assert resolve_secret(environ=environ) == b"f" * 20  # trailing newline dropped

    assert resolve_secret(secret_file=default_path_file(tmp_path), environ=environ) == b"g" * 20
    assert resolve_secret(secret=b"h" * 20, environ=environ) == b"h" * 20


def default_path_file(tmp_path: Path) -> Path:
    path = tmp_path / "explicit"
    path.write_bytes(b"g" * 20)
    path.chmod(0o600)
    return path


def test_short_secrets_are_refused(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="at least 16"):
        resolve_secret(secret=b"abc", environ={})
    path = tmp_path / "short"
    path.write_bytes(b"abc\n")
    path.chmod(0o600)
    with pytest.raises(ConfigError, match="at least 16"):
        load_secret_file(path)


def test_secret_files_readable_by_others_are_refused(tmp_path: Path) -> None:
    path = tmp_path / "open"
    path.write_bytes(b"x" * 32)
    path.chmod(0o644)
    with pytest.raises(ConfigError, match="readable by others"):
        load_secret_file(path)


def test_generated_secret_is_kept_on_the_next_start(tmp_path: Path) -> None:
    first, _, created = ensure_secret_file(tmp_path / "s")
    second, _, created_again = ensure_secret_file(tmp_path / "s")
    assert created and not created_again and first == second
